//! Pollux NVMe over Fabrics target, TCP transport (SPDK's `lib/nvmf` with its TCP transport).
//!
//! - [`pdu`]: the NVMe/TCP PDU codec, pure encode and decode with no socket in it (an
//!   initiator builds on it too).

pub mod pdu;
