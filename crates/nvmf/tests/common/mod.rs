//! The target in-process on 127.0.0.1 (an ephemeral port), and a small NVMe/TCP initiator of
//! the tests' own over a blocking std `TcpStream`, built on the crate's PDU codec.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::Duration;

use pollux_bdev::modules::malloc;
use pollux_bdev::BdevRegistry;
use pollux_env::cpumask::CpuMask;
use pollux_env::dma::{DmaConfig, DmaMemory};
use pollux_nvme::spec::{
    cns, fctype, opc, Command, Completion, ConnectCommand, ConnectData, PropertyCommand, Psdt,
    CNTLID_DYNAMIC,
};
use pollux_nvmf::pdu::{
    encode, parse_common_header, DataHeader, Digests, EncodeOptions, IcReq, Limits, Pdu, PduError,
    CH_BYTES,
};
use pollux_nvmf::{NvmfTarget, SubsystemOptions, TcpTransportOptions};
use pollux_reactor::{App, AppConfig, AppHandle};

pub const NQN: &str = "nqn.2016-06.io.spdk:cnode1";
pub const HOSTNQN: &str = "nqn.2014-08.org.nvmexpress:uuid:00000000-0000-0000-0000-000000000001";
pub const BLOCK: usize = 512;
pub const MALLOC_MIB: u64 = 16;

pub struct Tgt {
    pub app: AppHandle,
    pub target: Arc<NvmfTarget>,
    pub registry: Arc<BdevRegistry>,
    pub dma: Arc<DmaMemory>,
    pub addr: SocketAddr,
    join: Option<JoinHandle<()>>,
}

impl Tgt {
    /// A target with the TCP transport (`options`), subsystem [`NQN`] (allow any host
    /// unless `hosts` names some) on a 16 MiB malloc bdev, listening on 127.0.0.1:0.
    pub fn start(options: TcpTransportOptions, hosts: &[&str]) -> Self {
        let dma = DmaMemory::new(DmaConfig {
            size_mib: 160,
            no_huge: true,
        })
        .expect("DMA memory");
        let registry = BdevRegistry::new();
        malloc::create(
            &registry,
            &dma,
            malloc::MallocOptions::from_size_mib(Some("Malloc0".to_string()), MALLOC_MIB, 512),
        )
        .expect("malloc bdev");
        let core = CpuMask::available().first().expect("a core");
        let app = App::new(AppConfig {
            name: "nvmf-test".to_string(),
            cpumask: std::iter::once(core).collect(),
            handle_signals: false,
            ..AppConfig::default()
        })
        .expect("app");
        let handle = app.handle();
        let (ready_tx, ready_rx) = mpsc::channel();
        let join = std::thread::spawn(move || {
            app.run(move |_ctx| {
                let _ = ready_tx.send(());
            })
            .expect("app run");
        });
        ready_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("app started");
        let target = NvmfTarget::new(handle.clone(), registry.clone(), dma.clone());
        target.create_transport(options).expect("transport");
        let mut subsystem = SubsystemOptions::new(NQN);
        subsystem.allow_any_host = hosts.is_empty();
        subsystem.serial_number = "POLLUX0001".to_string();
        target.create_subsystem(subsystem).expect("subsystem");
        for host in hosts {
            target.add_host(NQN, host).expect("host");
        }
        target
            .add_namespace(NQN, "Malloc0", None, None)
            .expect("namespace");
        let addr = target
            .add_listener(NQN, "127.0.0.1:0".parse().expect("addr"))
            .expect("listener");
        Self {
            app: handle,
            target,
            registry,
            dma,
            addr,
            join: Some(join),
        }
    }
}

impl Drop for Tgt {
    fn drop(&mut self) {
        self.app.stop();
        if let Some(join) = self.join.take() {
            let _ = join.join();
        }
        self.target.shutdown();
    }
}

/// A test initiator: one connection (one queue).
pub struct Initiator {
    pub stream: TcpStream,
    pub digests: Digests,
    cid: u16,
    pub maxh2cdata: u32,
}

pub fn sgl_in_capsule(len: usize) -> [u64; 2] {
    [0, len as u64 | (0x01u64 << 56)]
}

pub fn sgl_transport(len: usize) -> [u64; 2] {
    [0, len as u64 | (0x5au64 << 56)]
}

/// What came back for a command.
#[derive(Debug)]
pub struct Reply {
    pub cqe: Completion,
    pub data: Vec<u8>,
}

impl Initiator {
    /// Connects and exchanges ICReq / ICResp.
    pub fn connect(addr: SocketAddr, digests: Digests) -> Self {
        let stream = TcpStream::connect(addr).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let mut this = Self {
            stream,
            digests,
            cid: 0,
            maxh2cdata: 0,
        };
        this.send(
            &Pdu::IcReq(IcReq {
                pfv: 0,
                hpda: 0,
                digests,
                maxr2t: 0,
            }),
            &[],
        );
        match this.recv().expect("ICResp") {
            (Pdu::IcResp(resp), _) => {
                assert_eq!(resp.digests, digests);
                assert_eq!(resp.cpda, 0);
                this.maxh2cdata = resp.maxh2cdata;
            }
            other => panic!("expected ICResp, got {other:?}"),
        }
        this
    }

    /// A connection with no ICReq sent.
    pub fn raw(addr: SocketAddr, digests: Digests) -> Self {
        let stream = TcpStream::connect(addr).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        Self {
            stream,
            digests,
            cid: 0,
            maxh2cdata: 0,
        }
    }

    pub fn send(&mut self, pdu: &Pdu, data: &[u8]) {
        let mut out = vec![0u8; 256 + data.len()];
        let options = EncodeOptions {
            digests: self.digests,
            pda: 0,
        };
        let len = encode(pdu, data, &options, &mut out).expect("encode");
        self.stream.write_all(&out[..len]).expect("send");
    }

    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("send");
    }

    /// Reads one PDU (`Err` on end of stream).
    pub fn recv(&mut self) -> std::io::Result<(Pdu, Vec<u8>)> {
        let mut ch = [0u8; CH_BYTES];
        self.stream.read_exact(&mut ch)?;
        let limits = Limits {
            digests: self.digests,
            max_capsule_data_bytes: 1 << 20,
            max_data_pdu_bytes: 1 << 20,
        };
        let layout = parse_common_header(&ch, &limits).map_err(invalid)?;
        let mut whole = vec![0u8; layout.total_bytes()];
        whole[..CH_BYTES].copy_from_slice(&ch);
        self.stream.read_exact(&mut whole[CH_BYTES..])?;
        let decoded = pollux_nvmf::pdu::decode(&whole, &limits).map_err(invalid)?;
        Ok((decoded.pdu, decoded.data.to_vec()))
    }

    /// Asserts the target closes the connection (after whatever it still sends).
    pub fn expect_closed(&mut self) {
        let mut rest = Vec::new();
        match self.stream.read_to_end(&mut rest) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            Err(e) => panic!("expected the target to close the connection: {e}"),
        }
    }

    pub fn next_cid(&mut self) -> u16 {
        self.cid = self.cid.wrapping_add(1);
        self.cid
    }

    /// Sends `cmd` (its CID set here) with `write` data in-capsule when it fits
    /// `in_capsule_max`, else through R2T / H2CData; returns the response and any C2HData.
    pub fn command(
        &mut self,
        mut cmd: Command,
        write: &[u8],
        in_capsule_max: usize,
        read_len: usize,
    ) -> Reply {
        cmd.cid = self.next_cid();
        cmd.psdt = Psdt::SglMptrAddress;
        if !write.is_empty() && write.len() <= in_capsule_max {
            cmd.dptr = sgl_in_capsule(write.len());
            self.send(&Pdu::CapsuleCmd(cmd), write);
        } else {
            cmd.dptr = sgl_transport(if write.is_empty() {
                read_len
            } else {
                write.len()
            });
            self.send(&Pdu::CapsuleCmd(cmd), &[]);
        }
        let mut data = Vec::new();
        loop {
            let (pdu, payload) = self.recv().expect("response");
            match pdu {
                Pdu::CapsuleResp(cqe) => {
                    assert_eq!(cqe.cid, cmd.cid);
                    return Reply { cqe, data };
                }
                Pdu::C2hData(header) => {
                    assert_eq!(header.cccid, cmd.cid);
                    assert_eq!(header.datao as usize, data.len());
                    data.extend_from_slice(&payload);
                }
                Pdu::R2t(r2t) => {
                    assert_eq!(r2t.cccid, cmd.cid);
                    let mut offset = r2t.r2to as usize;
                    let end = offset + r2t.r2tl as usize;
                    while offset < end {
                        let len = (end - offset).min(self.maxh2cdata as usize);
                        let header = DataHeader {
                            cccid: cmd.cid,
                            ttag: r2t.ttag,
                            datao: offset as u32,
                            datal: len as u32,
                            last: offset + len == end,
                            success: false,
                        };
                        self.send(&Pdu::H2cData(header), &write[offset..offset + len]);
                        offset += len;
                    }
                }
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    /// Fabrics Connect; returns the response.
    pub fn fabrics_connect(
        &mut self,
        qid: u16,
        sqsize: u16,
        subnqn: &str,
        hostnqn: &str,
        cntlid: u16,
        kato_ms: u32,
    ) -> Completion {
        let cmd = ConnectCommand {
            recfmt: 0,
            qid,
            sqsize,
            cattr: 0,
            kato_ms,
        }
        .to_command();
        let data = ConnectData {
            hostid: [1; 16],
            cntlid,
            subnqn: subnqn.to_string(),
            hostnqn: hostnqn.to_string(),
        }
        .encode();
        self.command(cmd, &data, 8192, 0).cqe
    }

    pub fn property_get(&mut self, offset: u32, eight_bytes: bool) -> u64 {
        let cmd = PropertyCommand {
            eight_bytes,
            offset,
            value: 0,
        }
        .to_command(fctype::PROPERTY_GET);
        let reply = self.command(cmd, &[], 0, 0);
        assert!(
            reply.cqe.status.is_success(),
            "property get {offset:#x}: {}",
            reply.cqe.status
        );
        u64::from(reply.cqe.dw0) | (u64::from(reply.cqe.dw1) << 32)
    }

    pub fn property_set(&mut self, offset: u32, value: u32) {
        let cmd = PropertyCommand {
            eight_bytes: false,
            offset,
            value: u64::from(value),
        }
        .to_command(fctype::PROPERTY_SET);
        let reply = self.command(cmd, &[], 0, 0);
        assert!(reply.cqe.status.is_success());
    }

    pub fn identify(&mut self, cns_value: u8, nsid: u32) -> Reply {
        let mut cmd = Command::new(opc::IDENTIFY);
        cmd.nsid = nsid;
        cmd.cdw10 = u32::from(cns_value);
        self.command(cmd, &[], 0, 4096)
    }

    /// An admin queue to [`NQN`] (or `subnqn`), enabled (CC.EN = 1, CSTS.RDY seen); returns it
    /// and the controller ID.
    pub fn admin(
        addr: SocketAddr,
        digests: Digests,
        subnqn: &str,
        hostnqn: &str,
        kato_ms: u32,
    ) -> (Self, u16) {
        let mut admin = Self::connect(addr, digests);
        let cqe = admin.fabrics_connect(0, 31, subnqn, hostnqn, CNTLID_DYNAMIC, kato_ms);
        assert!(cqe.status.is_success(), "admin connect: {}", cqe.status);
        let cntlid = cqe.dw0 as u16;
        admin.property_set(0x14, 0x0046_0001);
        assert_eq!(admin.property_get(0x1c, false) & 1, 1, "CSTS.RDY");
        (admin, cntlid)
    }

    pub fn read(&mut self, nsid: u32, slba: u64, blocks: usize) -> Reply {
        let mut cmd = Command::new(opc::READ);
        cmd.nsid = nsid;
        cmd.cdw10 = slba as u32;
        cmd.cdw11 = (slba >> 32) as u32;
        cmd.cdw12 = (blocks - 1) as u32;
        self.command(cmd, &[], 0, blocks * BLOCK)
    }

    pub fn write(&mut self, nsid: u32, slba: u64, data: &[u8], in_capsule_max: usize) -> Reply {
        let mut cmd = Command::new(opc::WRITE);
        cmd.nsid = nsid;
        cmd.cdw10 = slba as u32;
        cmd.cdw11 = (slba >> 32) as u32;
        cmd.cdw12 = (data.len() / BLOCK - 1) as u32;
        self.command(cmd, data, in_capsule_max, 0)
    }
}

fn invalid(error: PduError) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, error)
}

pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 9) as u8)
        .collect()
}

pub const CNS_CONTROLLER: u8 = cns::CONTROLLER;
