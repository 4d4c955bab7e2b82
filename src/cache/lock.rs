//! Advisory file locks (flock): shared/exclusive, released by the kernel
//! when the holder dies — so a SIGKILLed run never leaves a stale lock.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

/// A held lock; dropping it releases it.
#[derive(Debug)]
pub struct FileLock {
    _file: File,
}

/// Shared (many holders) or exclusive (one holder).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockMode {
    /// Many `run`s at once.
    Shared,
    /// `gc`, or the one computing a key.
    Exclusive,
}

impl FileLock {
    /// Blocks until the lock is held.
    pub fn acquire(path: &Path, mode: LockMode) -> io::Result<Self> {
        Self::lock(path, mode, true).map(|l| l.expect("blocking lock returns a lock"))
    }

    /// Takes the lock if it is free right now.
    pub fn try_acquire(path: &Path, mode: LockMode) -> io::Result<Option<Self>> {
        Self::lock(path, mode, false)
    }

    fn lock(path: &Path, mode: LockMode, block: bool) -> io::Result<Option<Self>> {
        if let Some(dir) = path.parent() {
            fs_err::create_dir_all(dir)?;
        }
        let file = fs_err::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)?
            .into_parts()
            .0;
        let mut op = match mode {
            LockMode::Shared => libc::LOCK_SH,
            LockMode::Exclusive => libc::LOCK_EX,
        };
        if !block {
            op |= libc::LOCK_NB;
        }
        loop {
            // SAFETY: flock on a valid, owned file descriptor.
            let rc = unsafe { libc::flock(file.as_raw_fd(), op) };
            if rc == 0 {
                return Ok(Some(FileLock { _file: file }));
            }
            let err = io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EWOULDBLOCK) if !block => return Ok(None),
                _ => {
                    return Err(io::Error::new(
                        err.kind(),
                        format!("locking `{}`: {err}", path.display()),
                    ))
                }
            }
        }
    }
}
