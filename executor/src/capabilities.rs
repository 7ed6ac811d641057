//! Docker's default capabilities: the 14 a container process keeps, and the calls that drop
//! every other one.
//!
//! The sandbox child runs these in order, while it is still root with every capability:
//!
//! 1. [`drop_bounding_set`]: no later `execve` (of a setuid binary, or by root) can regain
//!    anything outside [`DEFAULT_CAPABILITIES`]. Needs `CAP_SETPCAP`, so it comes first.
//! 2. [`set_keep_capabilities`]`(true)`, `setgroups`/`setgid`/`setuid` to the image's user,
//!    [`set_keep_capabilities`]`(false)`: the permitted set survives the uid change long enough
//!    for step 3 to decide.
//! 3. [`apply`]: root keeps the default set (effective and permitted); any other user keeps
//!    nothing, as Docker does for a non-root `USER`. The ambient set is cleared either way.
//!
//! The inheritable set is left empty even for root. Docker and runc set it to the default set
//! until CVE-2022-24769 (GHSA-2mm7-x5h6-5pvq): a non-root program with inheritable file
//! capabilities could then gain them on `execve`. Since moby 20.10.14 it is empty.
//!
//! Everything here is a plain `prctl`/`capset` through rustix's safe wrappers, allocates
//! nothing, and so may run in a `pre_exec` hook between `fork` and `execve`.

use rustix::io::Errno;
use rustix::thread::{self as thread, CapabilitySet, CapabilitySets};

/// A Linux capability, numbered as in `linux/capability.h`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum Capability {
    /// `CAP_CHOWN`
    Chown = 0,
    /// `CAP_DAC_OVERRIDE`
    DacOverride = 1,
    /// `CAP_DAC_READ_SEARCH`
    DacReadSearch = 2,
    /// `CAP_FOWNER`
    Fowner = 3,
    /// `CAP_FSETID`
    Fsetid = 4,
    /// `CAP_KILL`
    Kill = 5,
    /// `CAP_SETGID`
    Setgid = 6,
    /// `CAP_SETUID`
    Setuid = 7,
    /// `CAP_SETPCAP`
    Setpcap = 8,
    /// `CAP_LINUX_IMMUTABLE`
    LinuxImmutable = 9,
    /// `CAP_NET_BIND_SERVICE`
    NetBindService = 10,
    /// `CAP_NET_BROADCAST`
    NetBroadcast = 11,
    /// `CAP_NET_ADMIN`
    NetAdmin = 12,
    /// `CAP_NET_RAW`
    NetRaw = 13,
    /// `CAP_IPC_LOCK`
    IpcLock = 14,
    /// `CAP_IPC_OWNER`
    IpcOwner = 15,
    /// `CAP_SYS_MODULE`
    SysModule = 16,
    /// `CAP_SYS_RAWIO`
    SysRawio = 17,
    /// `CAP_SYS_CHROOT`
    SysChroot = 18,
    /// `CAP_SYS_PTRACE`
    SysPtrace = 19,
    /// `CAP_SYS_PACCT`
    SysPacct = 20,
    /// `CAP_SYS_ADMIN`
    SysAdmin = 21,
    /// `CAP_SYS_BOOT`
    SysBoot = 22,
    /// `CAP_SYS_NICE`
    SysNice = 23,
    /// `CAP_SYS_RESOURCE`
    SysResource = 24,
    /// `CAP_SYS_TIME`
    SysTime = 25,
    /// `CAP_SYS_TTY_CONFIG`
    SysTtyConfig = 26,
    /// `CAP_MKNOD`
    Mknod = 27,
    /// `CAP_LEASE`
    Lease = 28,
    /// `CAP_AUDIT_WRITE`
    AuditWrite = 29,
    /// `CAP_AUDIT_CONTROL`
    AuditControl = 30,
    /// `CAP_SETFCAP`
    Setfcap = 31,
    /// `CAP_MAC_OVERRIDE`
    MacOverride = 32,
    /// `CAP_MAC_ADMIN`
    MacAdmin = 33,
    /// `CAP_SYSLOG`
    Syslog = 34,
    /// `CAP_WAKE_ALARM`
    WakeAlarm = 35,
    /// `CAP_BLOCK_SUSPEND`
    BlockSuspend = 36,
    /// `CAP_AUDIT_READ`
    AuditRead = 37,
    /// `CAP_PERFMON`
    Perfmon = 38,
    /// `CAP_BPF`
    Bpf = 39,
    /// `CAP_CHECKPOINT_RESTORE`
    CheckpointRestore = 40,
}

impl Capability {
    /// The capability's number (its bit in `/proc/PID/status` masks).
    pub const fn number(self) -> u8 {
        self as u8
    }

    /// The capability's bit in a mask such as `CapEff`.
    pub const fn bit(self) -> u64 {
        1 << self.number()
    }
}

/// Docker's default capabilities (moby `oci/caps/defaults.go`), in Docker's order.
pub const DEFAULT_CAPABILITIES: &[Capability] = &[
    Capability::Chown,
    Capability::DacOverride,
    Capability::Fsetid,
    Capability::Fowner,
    Capability::Mknod,
    Capability::NetRaw,
    Capability::Setgid,
    Capability::Setuid,
    Capability::Setfcap,
    Capability::Setpcap,
    Capability::NetBindService,
    Capability::SysChroot,
    Capability::Kill,
    Capability::AuditWrite,
];

/// [`DEFAULT_CAPABILITIES`] as a mask, as `/proc/PID/status` prints it: `00000000a80425fb`.
pub const DEFAULT_CAPABILITY_MASK: u64 = mask(DEFAULT_CAPABILITIES);

/// The mask of `capabilities`.
pub const fn mask(capabilities: &[Capability]) -> u64 {
    let mut mask = 0;
    let mut index = 0;
    while index < capabilities.len() {
        mask |= capabilities[index].bit();
        index += 1;
    }
    mask
}

/// Why changing the calling thread's capabilities failed.
#[derive(Debug, thiserror::Error)]
pub enum CapabilityError {
    /// `prctl(PR_CAPBSET_READ)` failed for a reason other than "no such capability".
    #[error("reading capability {number} from the bounding set failed")]
    ReadBoundingSet {
        /// The capability's number.
        number: u32,
        /// The kernel's answer.
        #[source]
        source: Errno,
    },
    /// `prctl(PR_CAPBSET_DROP)` failed, usually because the caller lacks `CAP_SETPCAP`.
    #[error("dropping capability {number} from the bounding set failed")]
    DropFromBoundingSet {
        /// The capability's number.
        number: u32,
        /// The kernel's answer.
        #[source]
        source: Errno,
    },
    /// `prctl(PR_SET_KEEPCAPS)` failed.
    #[error("setting PR_SET_KEEPCAPS to {keep} failed")]
    KeepCapabilities {
        /// The requested value.
        keep: bool,
        /// The kernel's answer.
        #[source]
        source: Errno,
    },
    /// `prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)` failed.
    #[error("clearing the ambient capability set failed")]
    ClearAmbient(#[source] Errno),
    /// `capget` failed.
    #[error("reading the capability sets failed")]
    Read(#[source] Errno),
    /// `capset` failed.
    #[error("setting the capability sets failed")]
    Set(#[source] Errno),
}

/// Removes from the calling thread's bounding set every capability the kernel knows that is
/// not in [`DEFAULT_CAPABILITIES`], including ones newer than [`Capability`] names.
///
/// Call it while root with `CAP_SETPCAP`, before changing uid. Capabilities already gone
/// (the engine may itself run with a reduced bounding set) are skipped.
pub fn drop_bounding_set() -> Result<(), CapabilityError> {
    // Walk the bit numbers until PR_CAPBSET_READ says EINVAL, the kernel's "past
    // cap_last_cap": no need to read /proc/sys/kernel/cap_last_cap (which would allocate).
    for number in 0..u64::BITS {
        let capability = CapabilitySet::from_bits_retain(1 << number);
        let present = match thread::capability_is_in_bounding_set(capability) {
            Ok(present) => present,
            Err(Errno::INVAL) => break,
            Err(source) => return Err(CapabilityError::ReadBoundingSet { number, source }),
        };
        if present && DEFAULT_CAPABILITY_MASK & (1 << number) == 0 {
            thread::remove_capability_from_bounding_set(capability)
                .map_err(|source| CapabilityError::DropFromBoundingSet { number, source })?;
        }
    }
    Ok(())
}

/// Sets `PR_SET_KEEPCAPS`: while on, a `setuid` away from root keeps the permitted set (the
/// effective set is still cleared). Turn it on just before `setuid`, off right after.
pub fn set_keep_capabilities(keep: bool) -> Result<(), CapabilityError> {
    thread::set_keep_capabilities(keep)
        .map_err(|source| CapabilityError::KeepCapabilities { keep, source })
}

/// Sets the calling thread's capability sets for the process about to be executed; call it
/// after `setgid`/`setuid` (and after [`drop_bounding_set`]).
///
/// Root gets [`DEFAULT_CAPABILITIES`] as its effective and permitted sets, less any the
/// thread does not hold (a capability cannot be gained here, only kept). Any other user gets
/// empty sets. Either way the inheritable and ambient sets end up empty (see the module docs
/// for why inheritable is empty), so `execve` cannot hand a non-root program anything.
pub fn apply(user_is_root: bool) -> Result<(), CapabilityError> {
    thread::clear_ambient_capability_set().map_err(CapabilityError::ClearAmbient)?;
    let kept = if user_is_root {
        let current = thread::capabilities(None).map_err(CapabilityError::Read)?;
        current.permitted & CapabilitySet::from_bits_retain(DEFAULT_CAPABILITY_MASK)
    } else {
        CapabilitySet::empty()
    };
    let sets = CapabilitySets {
        effective: kept,
        permitted: kept,
        inheritable: CapabilitySet::empty(),
    };
    thread::set_capabilities(None, sets).map_err(CapabilityError::Set)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_mask_is_dockers() {
        // `docker run --rm busybox grep CapBnd /proc/self/status` prints 00000000a80425fb.
        assert_eq!(DEFAULT_CAPABILITY_MASK, 0x0000_0000_a804_25fb);
        assert_eq!(DEFAULT_CAPABILITIES.len(), 14);
    }

    #[test]
    fn numbers_match_rustix() {
        assert_eq!(Capability::Chown.bit(), CapabilitySet::CHOWN.bits());
        assert_eq!(Capability::SysAdmin.bit(), CapabilitySet::SYS_ADMIN.bits());
        assert_eq!(Capability::Setfcap.bit(), CapabilitySet::SETFCAP.bits());
        assert_eq!(
            Capability::AuditWrite.bit(),
            CapabilitySet::AUDIT_WRITE.bits()
        );
        assert_eq!(
            Capability::CheckpointRestore.bit(),
            CapabilitySet::CHECKPOINT_RESTORE.bits()
        );
    }
}
