//! PCI addresses (`0000:00:03.0`, or `00:03.0` with domain 0) and the sysfs paths they name.

use std::fmt;
use std::path::PathBuf;

/// Why a PCI address was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{text:?} is not a PCI address like 0000:00:03.0 ({reason})")]
pub struct PciAddressError {
    pub text: String,
    pub reason: &'static str,
}

/// Domain, bus, device, function.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PciAddress {
    pub domain: u32,
    pub bus: u8,
    pub device: u8,
    pub function: u8,
}

impl PciAddress {
    /// Parses `DDDD:BB:DD.F` or `BB:DD.F`.
    pub fn parse(text: &str) -> Result<Self, PciAddressError> {
        let error = |reason| PciAddressError {
            text: text.to_string(),
            reason,
        };
        let (head, function) = text
            .trim()
            .rsplit_once('.')
            .ok_or(error("no '.function'"))?;
        let parts: Vec<&str> = head.split(':').collect();
        let (domain, bus, device) = match parts.as_slice() {
            [domain, bus, device] => (*domain, *bus, *device),
            [bus, device] => ("0", *bus, *device),
            _ => return Err(error("expected domain:bus:device.function")),
        };
        let hex = |s: &str, what| {
            if s.is_empty() || s.len() > 8 {
                return Err(error(what));
            }
            u32::from_str_radix(s, 16).map_err(|_| error(what))
        };
        let domain = hex(domain, "bad domain")?;
        let bus = hex(bus, "bad bus")?;
        let device = hex(device, "bad device")?;
        let function = hex(function, "bad function")?;
        if bus > 0xff {
            return Err(error("bus above ff"));
        }
        if device > 0x1f {
            return Err(error("device above 1f"));
        }
        if function > 7 {
            return Err(error("function above 7"));
        }
        Ok(Self {
            domain,
            bus: bus as u8,
            device: device as u8,
            function: function as u8,
        })
    }

    /// `/sys/bus/pci/devices/<address>` under `sysfs_root` (normally `/sys`).
    pub fn sysfs_path(&self, sysfs_root: &str) -> PathBuf {
        PathBuf::from(format!("{sysfs_root}/bus/pci/devices/{self}"))
    }
}

impl fmt::Display for PciAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:04x}:{:02x}:{:02x}.{:x}",
            self.domain, self.bus, self.device, self.function
        )
    }
}

impl fmt::Debug for PciAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PciAddress({self})")
    }
}

impl std::str::FromStr for PciAddress {
    type Err = PciAddressError;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Self::parse(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints() {
        let address = PciAddress::parse("0000:00:03.0").unwrap();
        assert_eq!(address.bus, 0);
        assert_eq!(address.device, 3);
        assert_eq!(address.to_string(), "0000:00:03.0");
        assert_eq!(
            PciAddress::parse("af:1f.7").unwrap().to_string(),
            "0000:af:1f.7"
        );
        assert_eq!(
            PciAddress::parse("10000:01:00.1").unwrap().to_string(),
            "10000:01:00.1"
        );
    }

    #[test]
    fn refuses_malformed() {
        for bad in [
            "",
            "0000:00:03",
            "00:03",
            "0000:00:20.0",
            "0000:00:03.8",
            "0000:100:03.0",
            "xx:00.0",
            "0:0:0:0.0",
            "0000:00:03.0.1",
        ] {
            assert!(PciAddress::parse(bad).is_err(), "{bad} accepted");
        }
    }
}
