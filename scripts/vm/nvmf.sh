# shellcheck shell=sh
# Guest side of the nvmf suite (see nvmf.conf): the kernel's nvme-tcp initiator against
# pollux-nvmf on the host (10.0.2.2 over QEMU user networking); in the kernel-target variant
# the reverse, the kernel's nvmet-tcp target on a RAM disk for Pollux's initiator on the host.
# shellcheck source=/dev/null # lib.sh sits at /pollux in the guest
. /pollux/lib.sh

NQN=nqn.2016-06.io.pollux:vmtest
HOSTNQN=nqn.2014-08.org.nvmexpress:uuid:5e1ec7ed-0000-4000-8000-000000000001
HOST=10.0.2.2
DISK_MIB=96
PORT=""
read -r cmdline < /proc/cmdline
for word in $cmdline; do
    case "$word" in
        pollux.nvmf_port=*) PORT="${word#pollux.nvmf_port=}" ;;
    esac
done
[ -n "$PORT" ] || fail "no pollux.nvmf_port on the kernel command line"
DIGESTS=""
[ "$1" = digests ] && DIGESTS="-g -G"

step "network"
modprobe virtio_pci || fail "modprobe virtio_pci"
modprobe virtio_net || fail "modprobe virtio_net"
wait_for "[ -e /sys/class/net/eth0 ]" 30 || fail "no eth0"
ip link set lo up
ip link set eth0 up || fail "eth0 up"
ip addr add 10.0.2.15/24 dev eth0 || fail "address"
ip route add default via "$HOST" || fail "route"

if [ "$1" = kernel-target ]; then
    step "nvmet-tcp on a RAM disk"
    modprobe configfs || fail "modprobe configfs"
    mkdir -p /sys/kernel/config
    grep -q ' /sys/kernel/config ' /proc/mounts || mount -t configfs none /sys/kernel/config ||
        fail "mount configfs"
    modprobe brd rd_nr=1 rd_size=65536 || fail "modprobe brd"
    wait_for "[ -b /dev/ram0 ]" 10 || fail "no /dev/ram0"
    modprobe nvmet || fail "modprobe nvmet"
    modprobe nvmet_tcp || fail "modprobe nvmet_tcp"
    cfg=/sys/kernel/config/nvmet
    wait_for "[ -d $cfg/subsystems ]" 10 || fail "no $cfg"
    mkdir "$cfg/subsystems/$NQN" || fail "subsystem"
    echo 1 > "$cfg/subsystems/$NQN/attr_allow_any_host" || fail "allow any host"
    mkdir "$cfg/subsystems/$NQN/namespaces/1" || fail "namespace"
    printf %s /dev/ram0 > "$cfg/subsystems/$NQN/namespaces/1/device_path" || fail "device_path"
    echo 1 > "$cfg/subsystems/$NQN/namespaces/1/enable" || fail "enable the namespace"
    mkdir "$cfg/ports/1" || fail "port"
    echo tcp > "$cfg/ports/1/addr_trtype" || fail "addr_trtype"
    echo ipv4 > "$cfg/ports/1/addr_adrfam" || fail "addr_adrfam"
    echo 0.0.0.0 > "$cfg/ports/1/addr_traddr" || fail "addr_traddr"
    echo 4420 > "$cfg/ports/1/addr_trsvcid" || fail "addr_trsvcid"
    ln -s "$cfg/subsystems/$NQN" "$cfg/ports/1/subsystems/$NQN" || fail "link the port"
    # Listening on 4420 (0x1144 in /proc/net/tcp).
    wait_for "grep -q ':1144 00000000:0000 0A' /proc/net/tcp" 10 || fail "nothing listens on 4420"
    step "kernel target ready"
    # The host's initiator (bdevperf through QEMU's forward) connects, runs, and leaves: stay
    # up until nvmet created a controller for it and no connection to 4420 has been left for
    # 3 s. Deadlines by the clock (/proc/uptime), not by loop counts: under TCG on a loaded
    # host one turn of a loop may take far longer than its sleep.
    established="grep -q ':1144 [0-9A-F]*:[0-9A-F]* 01 ' /proc/net/tcp"
    deadline=$(($(cut -d. -f1 /proc/uptime) + 200))
    until dmesg | grep -q "nvmet: creating nvm controller"; do
        [ "$(cut -d. -f1 /proc/uptime)" -lt "$deadline" ] ||
            fail "no initiator connected to port 4420 within 200 s"
        sleep 0.5
    done
    echo "an initiator connected"
    quiet_since=$(cut -d. -f1 /proc/uptime)
    while [ $(($(cut -d. -f1 /proc/uptime) - quiet_since)) -lt 3 ]; do
        if eval "$established"; then quiet_since=$(cut -d. -f1 /proc/uptime); fi
        [ "$(cut -d. -f1 /proc/uptime)" -lt "$deadline" ] ||
            fail "the initiator did not leave within 200 s"
        sleep 0.2
    done
    dmesg | grep nvmet | tail -n 20
    dmesg | grep -q "nvmet: creating nvm controller" || fail "nvmet created no controller"
    if dmesg | grep -qi "nvmet_tcp: .*failed\|nvmet_tcp: .*error"; then
        fail "nvmet-tcp reported an error"
    fi
    exit 0
fi

step "nvme-tcp"
modprobe crc32c_generic || fail "modprobe crc32c_generic"
modprobe nvme_tcp || fail "modprobe nvme_tcp"
wait_for "[ -c /dev/nvme-fabrics ]" 10 || fail "no /dev/nvme-fabrics"
mkdir -p /etc/nvme /run
echo "$HOSTNQN" > /etc/nvme/hostnqn

step "discover"
nvme discover -t tcp -a "$HOST" -s "$PORT" -q "$HOSTNQN" > /tmp/discover 2>&1
rc=$?
cat /tmp/discover
[ "$rc" = 0 ] || fail "nvme discover failed (status $rc)"
grep -q "subnqn: *$NQN" /tmp/discover || fail "the discovery log does not list $NQN"
grep -q "trtype: *tcp" /tmp/discover || fail "the discovery log entry is not TCP"
grep -q "trsvcid: *$PORT" /tmp/discover || fail "the discovery log entry has the wrong port"

step "connect (two I/O queues${DIGESTS:+, digests})"
# shellcheck disable=SC2086 # DIGESTS is two words or none
nvme connect -t tcp -a "$HOST" -s "$PORT" -n "$NQN" -q "$HOSTNQN" -i 2 $DIGESTS ||
    fail "nvme connect failed"
wait_for "[ -b /dev/nvme0n1 ]" 30 || fail "no /dev/nvme0n1"
nvme list || true
[ "$(cat /sys/class/nvme/nvme0/subsysnqn)" = "$NQN" ] || fail "subsysnqn $(cat /sys/class/nvme/nvme0/subsysnqn)"
[ "$(cat /sys/class/nvme/nvme0/transport)" = tcp ] || fail "transport $(cat /sys/class/nvme/nvme0/transport)"
[ "$(blockdev --getsize64 /dev/nvme0n1)" = $((DISK_MIB << 20)) ] ||
    fail "size $(blockdev --getsize64 /dev/nvme0n1)"
queues="$(find /sys/block/nvme0n1/mq -mindepth 1 -maxdepth 1 | wc -l)"
echo "nvme0n1: $queues hardware queues"
[ "$queues" -ge 2 ] || fail "nvme0n1 has $queues queue(s), want 2"

step "fio verify, QD 32 on two queues"
# Two jobs, one per CPU (so each uses its own I/O queue), 4 KiB (in-capsule) to 128 KiB (R2T).
fio --name=verify --filename=/dev/nvme0n1 --ioengine=libaio --direct=1 --rw=randwrite \
    --bsrange=4k-128k --iodepth=32 --numjobs=2 --cpus_allowed=0-1 --cpus_allowed_policy=split \
    --size=16M --offset_increment=16M --verify=crc32c --verify_fatal=1 --do_verify=1 \
    --group_reporting > /tmp/fio.log 2>&1
fio_rc=$?
cat /tmp/fio.log
[ "$fio_rc" = 0 ] || fail "fio failed (status $fio_rc)"
grep -q "err= 0" /tmp/fio.log || fail "fio reported an error"

step "ext4 with checksummed files"
modprobe ext4 || fail "modprobe ext4"
mkfs.ext4 -q -F /dev/nvme0n1 || fail "mkfs.ext4"
mkdir -p /mnt
mount -t ext4 /dev/nvme0n1 /mnt || fail "mount"
dd if=/dev/urandom of=/mnt/random.bin bs=64k count=160 2>/dev/null || fail "write random.bin"
cp /bin/busybox /mnt/busybox || fail "copy busybox"
mkdir -p /mnt/dir
i=0
while [ "$i" -lt 20 ]; do
    dd if=/dev/urandom of="/mnt/dir/f$i" bs=4k count=$((i + 1)) 2>/dev/null || fail "write f$i"
    i=$((i + 1))
done
(cd /mnt && find . -type f | sort | xargs md5sum) > /tmp/sums || fail "md5sum"
umount /mnt || fail "umount"
echo 3 > /proc/sys/vm/drop_caches
mount -t ext4 -o ro /dev/nvme0n1 /mnt || fail "remount"
(cd /mnt && md5sum -c /tmp/sums > /dev/null) || fail "files differ after the remount"
umount /mnt || fail "umount after the check"
e2fsck -fn /dev/nvme0n1 || fail "e2fsck"
while read -r sum name; do
    echo "POLLUX-NVMF-MD5: ${name#./} $sum"
done < /tmp/sums

step "disconnect"
nvme disconnect -n "$NQN" || fail "nvme disconnect"
wait_for "[ ! -b /dev/nvme0n1 ]" 30 || fail "/dev/nvme0n1 still there after the disconnect"
if dmesg | grep -qi "i/o error"; then
    fail "the guest saw an I/O error"
fi
