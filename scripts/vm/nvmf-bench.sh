# shellcheck shell=sh
# NVMe/TCP benchmark, guest side (see nvmf-bench.conf): 4 KiB random reads at QD 128 over the
# guest's loopback, first the kernel's nvmet-tcp target (null_blk) with the kernel's nvme-tcp
# initiator and fio, then pollux-nvmf (null bdev) with bdevperf through Pollux's initiator.
# Prints per run:
#   NVMF-BENCH: stack=S iops=I busy_cores=B initiator_cores=C
# $1: variant tS (S seconds per run).
set -eu
# shellcheck source=/dev/null # lib.sh sits at /pollux in the guest
. /pollux/lib.sh

runtime_s="${1#t}"
case "$runtime_s" in
    '' | *[!0-9]*) fail "bad variant '$1' (want tS)" ;;
esac
NQN=nqn.2016-06.io.pollux:bench
QD=128

# The busy and total jiffies of all vCPUs so far (first line of /proc/stat).
cpu_jiffies() {
    read -r _ user nice system idle iowait irq softirq steal _ < /proc/stat
    total=$((user + nice + system + idle + iowait + irq + softirq + steal))
    echo "$((total - idle - iowait)) $total"
}

# Busy vCPUs (cores, two decimals) since the sample in $1 ("busy total").
busy_cores_since() {
    now="$(cpu_jiffies)"
    cpus="$(grep -c '^cpu[0-9]' /proc/stat)"
    awk -v b0="${1% *}" -v t0="${1#* }" -v b1="${now% *}" -v t1="${now#* }" -v n="$cpus" \
        'BEGIN { if (t1 > t0) printf "%.2f", (b1 - b0) * n / (t1 - t0); else print 0 }'
}

ip link set lo up

step "kernel: nvmet-tcp on null_blk, nvme-tcp initiator, fio"
modprobe configfs || fail "modprobe configfs"
mkdir -p /sys/kernel/config
grep -q ' /sys/kernel/config ' /proc/mounts || mount -t configfs none /sys/kernel/config ||
    fail "mount configfs"
modprobe null_blk nr_devices=1 gb=1 irqmode=0 || fail "modprobe null_blk"
wait_for "[ -b /dev/nullb0 ]" 10 || fail "no /dev/nullb0"
modprobe crc32c_generic || true
modprobe nvmet || fail "modprobe nvmet"
modprobe nvmet_tcp || fail "modprobe nvmet_tcp"
modprobe nvme_tcp || fail "modprobe nvme_tcp"
cfg=/sys/kernel/config/nvmet
mkdir "$cfg/subsystems/$NQN"
echo 1 > "$cfg/subsystems/$NQN/attr_allow_any_host"
mkdir "$cfg/subsystems/$NQN/namespaces/1"
printf %s /dev/nullb0 > "$cfg/subsystems/$NQN/namespaces/1/device_path"
echo 1 > "$cfg/subsystems/$NQN/namespaces/1/enable"
mkdir "$cfg/ports/1"
echo tcp > "$cfg/ports/1/addr_trtype"
echo ipv4 > "$cfg/ports/1/addr_adrfam"
echo 127.0.0.1 > "$cfg/ports/1/addr_traddr"
echo 4420 > "$cfg/ports/1/addr_trsvcid"
ln -s "$cfg/subsystems/$NQN" "$cfg/ports/1/subsystems/$NQN"
mkdir -p /etc/nvme /run
nvme connect -t tcp -a 127.0.0.1 -s 4420 -n "$NQN" -i 1 || fail "nvme connect"
wait_for "[ -b /dev/nvme0n1 ]" 30 || fail "no /dev/nvme0n1"
before="$(cpu_jiffies)"
fio --name=randread --filename=/dev/nvme0n1 --ioengine=libaio --direct=1 --rw=randread \
    --bs=4k --iodepth="$QD" --numjobs=1 --cpus_allowed=1 --time_based \
    --runtime="$runtime_s" --output-format=terse > /tmp/fio.terse 2> /tmp/fio.err ||
    { cat /tmp/fio.err; fail "fio failed"; }
busy="$(busy_cores_since "$before")"
# Terse v3: field 8 read IOPS, 88 / 89 usr / sys CPU (percent of one CPU).
iops="$(cut -d';' -f8 < /tmp/fio.terse)"
fio_cores="$(awk -F';' '{ u = $88; s = $89; sub(/%/, "", u); sub(/%/, "", s); printf "%.2f", (u + s) / 100 }' /tmp/fio.terse)"
echo "NVMF-BENCH: stack=kernel iops=$iops busy_cores=$busy initiator_cores=$fio_cores"
nvme disconnect -n "$NQN" || true

step "pollux: pollux-nvmf (null bdev, vCPU 0), bdevperf through Pollux's initiator (vCPU 1)"
cat > /tmp/target.json <<JSON
{"subsystems": [
  {"subsystem": "bdev", "config": [
    {"method": "bdev_null_create", "params": {"name": "Null0", "num_blocks": 2097152, "block_size": 512}}
  ]},
  {"subsystem": "nvmf", "config": [
    {"method": "nvmf_create_transport", "params": {"trtype": "TCP"}},
    {"method": "nvmf_create_subsystem", "params": {"nqn": "$NQN", "allow_any_host": true}},
    {"method": "nvmf_subsystem_add_ns", "params": {"nqn": "$NQN", "namespace": {"bdev_name": "Null0"}}},
    {"method": "nvmf_subsystem_add_listener", "params": {"nqn": "$NQN", "listen_address": {"trtype": "TCP", "adrfam": "IPv4", "traddr": "127.0.0.1", "trsvcid": "4421"}}}
  ]}
]}
JSON
cat > /tmp/initiator.json <<JSON
{"subsystems": [{"subsystem": "bdev", "config": [
  {"method": "bdev_nvme_attach_controller", "params": {"name": "Nvme0", "trtype": "TCP",
   "adrfam": "IPv4", "traddr": "127.0.0.1", "trsvcid": "4421", "subnqn": "$NQN"}}
]}]}
JSON
RUST_LOG=warn /bin/pollux-nvmf -c /tmp/target.json -m 0x1 --no-huge -s 160 -r /tmp/nvmf.sock \
    > /tmp/target.log 2>&1 &
target_pid=$!
wait_for "grep -q ':1145 00000000:0000 0A' /proc/net/tcp" 30 ||
    { cat /tmp/target.log; fail "pollux-nvmf does not listen on 4421"; }
before="$(cpu_jiffies)"
RUST_LOG=warn /bin/bdevperf -c /tmp/initiator.json -q "$QD" -o 4k -w randread -t "$runtime_s" \
    -m 0x2 --no-huge --json /tmp/bdevperf.json > /tmp/bdevperf.log 2>&1 ||
    { cat /tmp/bdevperf.log; fail "bdevperf failed"; }
busy="$(busy_cores_since "$before")"
cat /tmp/bdevperf.log
iops="$(grep -o '"iops": *[0-9.]*' /tmp/bdevperf.json | head -n1 | sed 's/.*: *//')"
echo "NVMF-BENCH: stack=pollux iops=${iops%.*} busy_cores=$busy initiator_cores=1.00"
kill -INT "$target_pid"
wait "$target_pid" || true
