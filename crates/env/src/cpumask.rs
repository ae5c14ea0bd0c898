//! Core masks as SPDK accepts them (`-m`): a hexadecimal mask with or without `0x`
//! (`0x3`, `F0`, as wide as [`MAX_CORES`] allows), or a bracketed list of cores and
//! ranges (`[0,2-4]`).

use std::fmt;

/// Widest mask accepted, as SPDK's `SPDK_CPUSET_SIZE`.
pub const MAX_CORES: usize = 1024;
const WORDS: usize = MAX_CORES / 64;

/// Why a core mask was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CpuMaskError {
    #[error("empty core mask")]
    Empty,
    #[error("core mask {mask:?}: {character:?} is not a hexadecimal digit")]
    BadHexDigit { mask: String, character: char },
    #[error("core mask {mask:?} is wider than {MAX_CORES} cores")]
    TooWide { mask: String },
    #[error("core list {mask:?}: {item:?} is not a core number or a range like 2-4")]
    BadListItem { mask: String, item: String },
    #[error("core list {mask:?}: range {first}-{last} runs backwards")]
    BackwardsRange {
        mask: String,
        first: usize,
        last: usize,
    },
    #[error("core list {mask:?} is missing its closing ']'")]
    UnclosedList { mask: String },
    #[error("core {core} is outside the {MAX_CORES} cores a mask can name")]
    CoreOutOfRange { core: usize },
    #[error("core mask {mask:?} selects no core")]
    NoCoreSelected { mask: String },
    #[error(
        "core {core} of mask {mask:?} is not available on this machine (available: {available})"
    )]
    CoreNotAvailable {
        mask: String,
        core: usize,
        available: Box<CpuMask>,
    },
}

/// A set of cores, at most [`MAX_CORES`] wide.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct CpuMask {
    words: [u64; WORDS],
}

impl CpuMask {
    /// The empty set.
    pub const fn new() -> Self {
        Self { words: [0; WORDS] }
    }

    /// Parses an SPDK-style mask (`0x3`, `F0`, `[0,2-4]`). It is not checked against this machine:
    /// see [`CpuMask::parse_available`].
    pub fn parse(text: &str) -> Result<Self, CpuMaskError> {
        let trimmed = text.trim();
        if trimmed.is_empty() {
            return Err(CpuMaskError::Empty);
        }
        let mask = if let Some(list) = trimmed.strip_prefix('[') {
            let inner = list
                .strip_suffix(']')
                .ok_or_else(|| CpuMaskError::UnclosedList {
                    mask: text.to_string(),
                })?;
            Self::parse_list(text, inner)?
        } else {
            Self::parse_hex(text, trimmed)?
        };
        if mask.is_empty() {
            return Err(CpuMaskError::NoCoreSelected {
                mask: text.to_string(),
            });
        }
        Ok(mask)
    }

    /// Parses a mask and checks that every core in it is one this process may run on.
    pub fn parse_available(text: &str) -> Result<Self, CpuMaskError> {
        let mask = Self::parse(text)?;
        mask.check_available(text, &Self::available())?;
        Ok(mask)
    }

    /// Fails on the first core of `self` that `available` lacks.
    pub fn check_available(&self, text: &str, available: &CpuMask) -> Result<(), CpuMaskError> {
        match self.iter().find(|core| !available.contains(*core)) {
            Some(core) => Err(CpuMaskError::CoreNotAvailable {
                mask: text.to_string(),
                core,
                available: Box::new(*available),
            }),
            None => Ok(()),
        }
    }

    /// The cores this process may run on (its scheduler affinity).
    pub fn available() -> Self {
        let mut mask = Self::new();
        // SAFETY: cpu_set_t is plain data; zeroed is a valid empty set, and sched_getaffinity
        // writes at most size_of::<cpu_set_t>() bytes into it.
        let set = unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
                return Self::online_from_sysfs();
            }
            set
        };
        let limit = (libc::CPU_SETSIZE as usize).min(MAX_CORES);
        for core in 0..limit {
            // SAFETY: core < CPU_SETSIZE, the size of `set`.
            if unsafe { libc::CPU_ISSET(core, &set) } {
                mask.set(core);
            }
        }
        mask
    }

    fn online_from_sysfs() -> Self {
        std::fs::read_to_string("/sys/devices/system/cpu/online")
            .ok()
            .and_then(|list| Self::parse(&format!("[{}]", list.trim())).ok())
            .unwrap_or_else(|| {
                let mut mask = Self::new();
                mask.set(0);
                mask
            })
    }

    fn parse_hex(original: &str, text: &str) -> Result<Self, CpuMaskError> {
        let digits = text
            .strip_prefix("0x")
            .or_else(|| text.strip_prefix("0X"))
            .unwrap_or(text);
        if digits.is_empty() {
            return Err(CpuMaskError::Empty);
        }
        let mut mask = Self::new();
        // Least significant digit last; each digit covers four cores.
        for (position, character) in digits.chars().rev().enumerate() {
            let value = character
                .to_digit(16)
                .ok_or_else(|| CpuMaskError::BadHexDigit {
                    mask: original.to_string(),
                    character,
                })?;
            if value == 0 {
                continue;
            }
            let first_core = position * 4;
            if first_core + (32 - value.leading_zeros() as usize) > MAX_CORES {
                return Err(CpuMaskError::TooWide {
                    mask: original.to_string(),
                });
            }
            for bit in 0..4 {
                if value & (1 << bit) != 0 {
                    mask.set(first_core + bit);
                }
            }
        }
        Ok(mask)
    }

    fn parse_list(original: &str, inner: &str) -> Result<Self, CpuMaskError> {
        let mut mask = Self::new();
        for item in inner.split(',') {
            let item = item.trim();
            let bad_item = || CpuMaskError::BadListItem {
                mask: original.to_string(),
                item: item.to_string(),
            };
            let (first, last) = match item.split_once('-') {
                Some((a, b)) => (
                    a.trim().parse::<usize>().map_err(|_| bad_item())?,
                    b.trim().parse::<usize>().map_err(|_| bad_item())?,
                ),
                None => {
                    let core = item.parse::<usize>().map_err(|_| bad_item())?;
                    (core, core)
                }
            };
            if first > last {
                return Err(CpuMaskError::BackwardsRange {
                    mask: original.to_string(),
                    first,
                    last,
                });
            }
            if last >= MAX_CORES {
                return Err(CpuMaskError::CoreOutOfRange { core: last });
            }
            for core in first..=last {
                mask.set(core);
            }
        }
        Ok(mask)
    }

    /// Adds `core`. Panics when `core >= MAX_CORES` (a programming error: parsed input is checked).
    pub fn set(&mut self, core: usize) {
        assert!(core < MAX_CORES, "core {core} beyond MAX_CORES");
        self.words[core / 64] |= 1 << (core % 64);
    }

    /// Removes `core`.
    pub fn clear(&mut self, core: usize) {
        if core < MAX_CORES {
            self.words[core / 64] &= !(1 << (core % 64));
        }
    }

    /// Whether `core` is in the set.
    pub fn contains(&self, core: usize) -> bool {
        core < MAX_CORES && self.words[core / 64] & (1 << (core % 64)) != 0
    }

    /// Number of cores in the set.
    pub fn count(&self) -> usize {
        self.words.iter().map(|w| w.count_ones() as usize).sum()
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.words.iter().all(|w| *w == 0)
    }

    /// Lowest core in the set.
    pub fn first(&self) -> Option<usize> {
        self.iter().next()
    }

    /// Cores in ascending order.
    pub fn iter(&self) -> impl Iterator<Item = usize> + '_ {
        self.words.iter().enumerate().flat_map(|(index, word)| {
            let word = *word;
            (0..64)
                .filter(move |bit| word & (1u64 << bit) != 0)
                .map(move |bit| index * 64 + bit)
        })
    }
}

impl FromIterator<usize> for CpuMask {
    fn from_iter<I: IntoIterator<Item = usize>>(cores: I) -> Self {
        let mut mask = Self::new();
        for core in cores {
            mask.set(core);
        }
        mask
    }
}

/// Hexadecimal with `0x`, as SPDK prints masks.
impl fmt::Display for CpuMask {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let top = self.words.iter().rposition(|w| *w != 0);
        match top {
            None => write!(f, "0x0"),
            Some(top) => {
                write!(f, "0x{:x}", self.words[top])?;
                for word in self.words[..top].iter().rev() {
                    write!(f, "{word:016x}")?;
                }
                Ok(())
            }
        }
    }
}

impl fmt::Debug for CpuMask {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CpuMask({self})")
    }
}

impl std::str::FromStr for CpuMask {
    type Err = CpuMaskError;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Self::parse(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cores(text: &str) -> Vec<usize> {
        CpuMask::parse(text).unwrap().iter().collect()
    }

    #[test]
    fn hex_masks() {
        assert_eq!(cores("0x3"), vec![0, 1]);
        assert_eq!(cores("0X3"), vec![0, 1]);
        assert_eq!(cores("F0"), vec![4, 5, 6, 7]);
        assert_eq!(cores("f0"), vec![4, 5, 6, 7]);
        assert_eq!(cores("1"), vec![0]);
        assert_eq!(cores(" 0x5 "), vec![0, 2]);
    }

    #[test]
    fn masks_wider_than_64_cores() {
        assert_eq!(cores("0x10000000000000001"), vec![0, 64]);
        let wide = format!("0x8{}", "0".repeat(255));
        assert_eq!(cores(&wide), vec![1023]);
        let too_wide = format!("0x1{}", "0".repeat(256));
        assert!(matches!(
            CpuMask::parse(&too_wide),
            Err(CpuMaskError::TooWide { .. })
        ));
        // Leading zeros never make a mask too wide.
        let padded = format!("0x{}1", "0".repeat(400));
        assert_eq!(cores(&padded), vec![0]);
    }

    #[test]
    fn lists_and_ranges() {
        assert_eq!(cores("[0,2-4]"), vec![0, 2, 3, 4]);
        assert_eq!(cores("[1]"), vec![1]);
        assert_eq!(cores("[ 3 , 1-2 ]"), vec![1, 2, 3]);
        assert_eq!(cores("[100-101]"), vec![100, 101]);
    }

    #[test]
    fn malformed_masks() {
        assert_eq!(CpuMask::parse(""), Err(CpuMaskError::Empty));
        assert_eq!(CpuMask::parse("0x"), Err(CpuMaskError::Empty));
        assert!(matches!(
            CpuMask::parse("0xZ3"),
            Err(CpuMaskError::BadHexDigit { character: 'Z', .. })
        ));
        assert!(matches!(
            CpuMask::parse("[0,2-4"),
            Err(CpuMaskError::UnclosedList { .. })
        ));
        assert!(matches!(
            CpuMask::parse("[a]"),
            Err(CpuMaskError::BadListItem { .. })
        ));
        assert!(matches!(
            CpuMask::parse("[1,]"),
            Err(CpuMaskError::BadListItem { .. })
        ));
        assert!(matches!(
            CpuMask::parse("[4-2]"),
            Err(CpuMaskError::BackwardsRange {
                first: 4,
                last: 2,
                ..
            })
        ));
        assert!(matches!(
            CpuMask::parse("[2000]"),
            Err(CpuMaskError::CoreOutOfRange { core: 2000 })
        ));
        assert!(matches!(
            CpuMask::parse("0x0"),
            Err(CpuMaskError::NoCoreSelected { .. })
        ));
        assert!(matches!(
            CpuMask::parse("-1"),
            Err(CpuMaskError::BadHexDigit { .. })
        ));
    }

    #[test]
    fn cores_this_machine_lacks_are_refused() {
        let available: CpuMask = [0, 1].into_iter().collect();
        let mask = CpuMask::parse("0x5").unwrap();
        let error = mask.check_available("0x5", &available).unwrap_err();
        assert!(matches!(
            error,
            CpuMaskError::CoreNotAvailable { core: 2, .. }
        ));
        assert!(error.to_string().contains("core 2"));
        let beyond = format!("[{}]", MAX_CORES - 1);
        assert!(matches!(
            CpuMask::parse_available(&beyond),
            Err(CpuMaskError::CoreNotAvailable { .. })
        ));
    }

    #[test]
    fn available_holds_the_calling_core() {
        let available = CpuMask::available();
        assert!(!available.is_empty());
        // SAFETY: sched_getcpu has no preconditions.
        let current = unsafe { libc::sched_getcpu() };
        assert!(available.contains(current as usize));
        assert!(CpuMask::parse_available(&available.to_string()).is_ok());
    }

    #[test]
    fn display_round_trips() {
        for text in ["0x3", "0xf0", "0x10000000000000001"] {
            assert_eq!(CpuMask::parse(text).unwrap().to_string(), text);
        }
        assert_eq!(CpuMask::new().to_string(), "0x0");
        let mask = CpuMask::parse("[0,2-4,70]").unwrap();
        assert_eq!(CpuMask::parse(&mask.to_string()).unwrap(), mask);
        assert_eq!(mask.count(), 5);
        assert_eq!(mask.first(), Some(0));
    }
}
