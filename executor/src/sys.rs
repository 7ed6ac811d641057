//! The few raw system calls the sandbox needs that neither nix nor rustix wraps safely. Every
//! `unsafe` block of the sandbox lives here, each with the reason it is sound; everything else
//! calls these safe functions.

use std::io;
use std::os::fd::AsRawFd;

use nix::sys::signal::{SigHandler, Signal};
use nix::unistd::{ForkResult, Pid};

/// Which side of a [`fork`] this is.
pub(crate) enum Forked {
    /// The original process; `child` is the new one.
    Parent {
        /// The child's pid.
        child: Pid,
    },
    /// The new process.
    Child,
}

/// How many threads this process has, from `/proc/self/task`.
fn thread_count() -> io::Result<usize> {
    Ok(std::fs::read_dir("/proc/self/task")?.count())
}

/// `fork(2)`, refused unless this process has a single thread.
///
/// The sandbox helper forks the container's first process after `unshare(CLONE_NEWPID)`; with a
/// single thread the child is a complete copy of the process, so it may allocate and use any
/// library code afterwards. With several threads a lock held by another thread at the time of
/// the fork would stay locked forever in the child, so that case is an error.
pub(crate) fn fork() -> io::Result<Forked> {
    let threads = thread_count()?;
    if threads != 1 {
        return Err(io::Error::other(format!(
            "cannot fork the sandbox from a process with {threads} threads"
        )));
    }
    // SAFETY: the process has exactly one thread (checked just above; nothing in the helper
    // starts threads), so the child inherits no lock held by another thread and may run
    // arbitrary code, as after fork in any single-threaded program.
    match unsafe { nix::unistd::fork() }? {
        ForkResult::Parent { child } => Ok(Forked::Parent { child }),
        ForkResult::Child => Ok(Forked::Child),
    }
}

/// Closes every file descriptor from 3 up, at the start of the helper process.
///
/// Must run before the process opens any descriptor of its own (it is the first thing the
/// helper does after `main` hands over): it closes whatever the spawning process leaked
/// without `O_CLOEXEC`, so none of it can reach the container (CVE-2019-5736, CVE-2024-21626).
pub(crate) fn close_inherited_fds() -> io::Result<()> {
    // SAFETY: close_range(2) only closes descriptors. It runs before the helper has opened or
    // wrapped any descriptor above 2 in an owning type (the helper's entry point calls it
    // first), so no live `OwnedFd`/`File` is invalidated behind its owner's back.
    let result = unsafe { libc::close_range(3, libc::c_uint::MAX, 0) };
    if result == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Marks every file descriptor from 3 up close-on-exec, just before `execve`, so the
/// process starts with stdin, stdout and stderr only — whatever a library opened without
/// `O_CLOEXEC`. Descriptors stay usable until the exec (the error pipe is one of them).
pub(crate) fn cloexec_from_3() -> io::Result<()> {
    // SAFETY: with CLOSE_RANGE_CLOEXEC, close_range(2) only sets the close-on-exec flag; no
    // descriptor is closed, so no owner's descriptor is invalidated.
    let result = unsafe {
        libc::close_range(
            3,
            libc::c_uint::MAX,
            libc::CLOSE_RANGE_CLOEXEC as libc::c_int,
        )
    };
    if result == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Resets the disposition of every catchable signal to its default. `execve` keeps ignored
/// signals ignored, and Rust's runtime ignores `SIGPIPE`; a process in the sandbox must start
/// as it would under Docker, with default dispositions.
pub(crate) fn reset_signal_dispositions() -> nix::Result<()> {
    for signal in Signal::iterator() {
        if matches!(signal, Signal::SIGKILL | Signal::SIGSTOP) {
            continue;
        }
        // SAFETY: installing SIG_DFL runs no code of ours in signal context, so none of the
        // async-signal-safety requirements of a handler apply.
        unsafe { nix::sys::signal::signal(signal, SigHandler::SigDfl) }?;
    }
    Ok(())
}

/// Sets `IFF_UP` on the network interface `name` (the loopback of a fresh network namespace).
pub(crate) fn set_interface_up(name: &str) -> io::Result<()> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, socket};

    let bytes = name.as_bytes();
    if bytes.len() >= libc::IFNAMSIZ || bytes.contains(&0) {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    let socket = socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    // SAFETY: ifreq is plain old data (a name array and a union of integers and addresses);
    // all zeroes is a valid value of it.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (slot, byte) in request.ifr_name.iter_mut().zip(bytes) {
        *slot = *byte as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS reads the NUL-terminated name (the array is zeroed past the name,
    // which is shorter than IFNAMSIZ) and writes only `ifr_ifru.ifru_flags` of the ifreq we
    // own for the duration of the call.
    if unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCGIFFLAGS, &mut request) } == -1 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: SIOCGIFFLAGS has just initialized the `ifru_flags` member of the union.
    let flags = unsafe { request.ifr_ifru.ifru_flags };
    request.ifr_ifru.ifru_flags = flags | libc::IFF_UP as libc::c_short;
    // SAFETY: SIOCSIFFLAGS only reads the ifreq we own: the name and the flags set above.
    if unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCSIFFLAGS, &request) } == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `struct sock_fprog` from `linux/filter.h`, pointing at seccompiler's `seccompiler::sock_filter`s (which
/// mirror `struct seccompiler::sock_filter`, `#[repr(C)]`).
#[repr(C)]
struct SocketFilterProgram {
    length: u16,
    filter: *const seccompiler::sock_filter,
}

/// `seccomp(SECCOMP_SET_MODE_FILTER, 0, &program)`.
pub(crate) fn seccomp_set_mode_filter(instructions: &[seccompiler::sock_filter]) -> io::Result<()> {
    let length = u16::try_from(instructions.len())
        .ok()
        .filter(|length| (1..=crate::seccomp::MAX_INSTRUCTIONS as u16).contains(length))
        .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
    let program = SocketFilterProgram {
        length,
        filter: instructions.as_ptr(),
    };
    // SAFETY: `program` is a valid `struct sock_fprog` whose `filter` points at `length`
    // initialized `#[repr(C)]` instructions borrowed for the whole call; the kernel copies
    // them (`copy_from_user`) and keeps no pointer into our memory. Flags 0: no TSYNC, so
    // only the calling thread is affected.
    let result = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::c_ulong::from(libc::SECCOMP_SET_MODE_FILTER),
            0 as libc::c_ulong,
            &raw const program,
        )
    };
    if result == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
