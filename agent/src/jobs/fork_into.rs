//! Forking a job's process straight into the job's cgroup: clone3 with `CLONE_INTO_CGROUP`
//! (Linux 5.7; `cgroup.kill`, which the agent requires for cgroups, came in 5.14).
//!
//! A child that moves itself into a cgroup between fork and exec (a write to `cgroup.procs`)
//! makes the kernel take the cgroup threadgroup lock for writing, which waits for an RCU grace
//! period: from about a millisecond on an idle host to 10-20 ms on a loaded one, on every
//! spawn, before the command even starts. A process born in the cgroup takes that lock for
//! reading only.
//!
//! Between clone and exec the child does what `process::command`'s pre_exec does (setsid,
//! fchdir into the working directory) and what std does there (stdio onto 0, 1 and 2, SIGPIPE
//! back to its default, no blocked signal), calling only async-signal-safe functions on memory
//! prepared before the clone. Where clone3 or the flag is refused (an older kernel, a seccomp
//! filter), [`ForkError::Unsupported`] tells the caller to use `Command::spawn` instead.

use std::ffi::{CString, OsStr, OsString};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::process::Command;

use nix::libc;

/// `struct clone_args` of clone3(2) (the fields up to `cgroup`, Linux 5.7).
#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// What `Command::arg` stores for an argument with a NUL byte in it.
const NUL_ARGUMENT: &str = "<string-with-nul>";

/// What the child execs, every string made before the clone (the child may not allocate).
pub struct Plan {
    path: CString,
    _strings: Vec<CString>,
    argv: Vec<*const libc::c_char>,
    envp: Vec<*const libc::c_char>,
}

// SAFETY: the pointers point into `_strings` and `path`, owned by the plan and never changed.
unsafe impl Send for Plan {}

impl Plan {
    /// The program, arguments and environment `cmd` would give its child (the agent's own
    /// environment with `cmd`'s changes; `process::command` never clears it). None when the
    /// program is not a path (a PATH search is left to std) or a word holds a NUL byte.
    pub fn of(cmd: &Command) -> Option<Plan> {
        let program = cmd.get_program();
        if !program.as_bytes().contains(&b'/') {
            return None;
        }
        let cstr = |s: &OsStr| CString::new(s.as_bytes()).ok();
        let path = cstr(program)?;
        let mut env: Vec<(OsString, OsString)> = std::env::vars_os().collect();
        for (k, v) in cmd.get_envs() {
            env.retain(|(name, _)| name != k);
            if let Some(v) = v {
                env.push((k.to_os_string(), v.to_os_string()));
            }
        }
        let mut strings = Vec::new();
        strings.push(path.clone());
        for a in cmd.get_args() {
            // std keeps an argument holding a NUL byte as this text and refuses to spawn the
            // command: left to std, which says so.
            if a == NUL_ARGUMENT {
                return None;
            }
            strings.push(cstr(a)?);
        }
        let argc = strings.len();
        for (k, v) in env {
            let mut entry = k.into_vec();
            entry.push(b'=');
            entry.extend_from_slice(v.as_bytes());
            strings.push(CString::new(entry).ok()?);
        }
        let ptrs = |s: &[CString]| -> Vec<*const libc::c_char> {
            s.iter()
                .map(|c| c.as_ptr())
                .chain(std::iter::once(std::ptr::null()))
                .collect()
        };
        let argv = ptrs(&strings[..argc]);
        let envp = ptrs(&strings[argc..]);
        Some(Plan {
            path,
            _strings: strings,
            argv,
            envp,
        })
    }
}

/// The child and the parent's ends of its pipes.
pub struct Child {
    pub pid: i32,
    pub stdin: OwnedFd,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
}

#[derive(Debug, thiserror::Error)]
pub enum ForkError {
    /// clone3 or `CLONE_INTO_CGROUP` is not available here: spawn another way.
    #[error("clone3 into a cgroup is not available: {0}")]
    Unsupported(io::Error),
    #[error(transparent)]
    Failed(#[from] io::Error),
}

/// A pipe whose two ends are close-on-exec and above stderr, so that moving the child's ends
/// onto 0, 1 and 2 never overwrites another of them.
fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    let lift = |fd: OwnedFd| -> io::Result<OwnedFd> {
        if fd.as_raw_fd() > 2 {
            return Ok(fd);
        }
        Ok(rustix::io::fcntl_dupfd_cloexec(&fd, 3)?)
    };
    Ok((lift(r)?, lift(w)?))
}

/// Forks `plan` into the cgroup whose directory is open as `cgroup`, working in `cwd`, with
/// its stdin, stdout and stderr on new pipes; returns once it has exec'd (an exec failure is
/// the error, the child reaped). Blocking. To be called under the reaper's lock, as every
/// spawn is, so that the child is registered before anyone can reap it.
pub fn spawn(plan: &Plan, cwd: BorrowedFd<'_>, cgroup: BorrowedFd<'_>) -> Result<Child, ForkError> {
    let (stdin_r, stdin_w) = pipe()?;
    let (stdout_r, stdout_w) = pipe()?;
    let (stderr_r, stderr_w) = pipe()?;
    let (status_r, status_w) = pipe()?;
    let ends = ChildEnds {
        stdio: [
            stdin_r.as_raw_fd(),
            stdout_w.as_raw_fd(),
            stderr_w.as_raw_fd(),
        ],
        cwd: cwd.as_raw_fd(),
        status: status_w.as_raw_fd(),
    };
    let mut args = CloneArgs {
        flags: CLONE_INTO_CGROUP,
        exit_signal: libc::SIGCHLD as u64,
        cgroup: cgroup.as_raw_fd() as u64,
        ..CloneArgs::default()
    };
    // SAFETY: clone3 without CLONE_VM or a stack is fork(2) with more arguments: the child gets
    // a copy of this thread's memory, in which `child_exec` only makes async-signal-safe calls
    // on data prepared above, then execs or exits.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &mut args as *mut CloneArgs,
            std::mem::size_of::<CloneArgs>(),
        )
    };
    if ret == 0 {
        // SAFETY: in the child (see above).
        unsafe { child_exec(plan, &ends) }
    }
    if ret < 0 {
        let e = io::Error::last_os_error();
        return Err(match e.raw_os_error() {
            Some(libc::ENOSYS | libc::EPERM | libc::EINVAL | libc::E2BIG) => {
                ForkError::Unsupported(e)
            }
            _ => ForkError::Failed(e),
        });
    }
    let pid = ret as i32;
    drop((stdin_r, stdout_w, stderr_w, status_w));
    if let Some(errno) = exec_error(&status_r) {
        // Not registered with the reaper yet, so reaped here (the reaper waits for the lock).
        let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None);
        return Err(ForkError::Failed(io::Error::from_raw_os_error(errno)));
    }
    Ok(Child {
        pid,
        stdin: stdin_w,
        stdout: stdout_r,
        stderr: stderr_r,
    })
}

/// The child's descriptors, as raw numbers (nothing is dropped in the child).
struct ChildEnds {
    stdio: [RawFd; 3],
    cwd: RawFd,
    status: RawFd,
}

/// The errno the child wrote before exiting, None once its exec closed the pipe.
fn exec_error(status: &OwnedFd) -> Option<i32> {
    let mut buf = [0u8; 4];
    loop {
        match rustix::io::read(status, &mut buf) {
            Ok(4) => return Some(i32::from_ne_bytes(buf)),
            Ok(_) => return None,
            Err(rustix::io::Errno::INTR) => continue,
            // Cannot tell; the exit comes through the reaper as for any child.
            Err(_) => return None,
        }
    }
}

/// In the child: set up and exec, or report errno on the status pipe and exit 127.
///
/// # Safety
/// Only between clone and exec, in the child.
unsafe fn child_exec(plan: &Plan, ends: &ChildEnds) -> ! {
    let fail = |ends: &ChildEnds| -> ! {
        // SAFETY: errno, write and _exit are async-signal-safe.
        unsafe {
            let errno = *libc::__errno_location();
            let bytes = errno.to_ne_bytes();
            libc::write(ends.status, bytes.as_ptr().cast(), bytes.len());
            libc::_exit(127)
        }
    };
    // SAFETY: every call is async-signal-safe and takes data made before the clone.
    unsafe {
        for (target, fd) in ends.stdio.iter().enumerate() {
            // The pipes are above 2 (see `pipe`): dup2 makes a copy without close-on-exec.
            if libc::dup2(*fd, target as RawFd) < 0 {
                fail(ends);
            }
        }
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        let mut none: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut none);
        libc::pthread_sigmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
        if libc::setsid() < 0 || libc::fchdir(ends.cwd) < 0 {
            fail(ends);
        }
        libc::execve(plan.path.as_ptr(), plan.argv.as_ptr(), plan.envp.as_ptr());
        fail(ends)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plan_carries_the_commands_words_and_environment_changes() {
        let mut cmd = Command::new("/bin/sh");
        cmd.args(["-c", "echo hi"])
            .env("DGLRUN_TEST_PLAN", "a=b")
            .env_remove("PATH");
        let plan = Plan::of(&cmd).unwrap();
        let words = |v: &[*const libc::c_char]| -> Vec<String> {
            v.iter()
                .take_while(|p| !p.is_null())
                // SAFETY: NUL-terminated strings owned by the plan.
                .map(|p| {
                    unsafe { std::ffi::CStr::from_ptr(*p) }
                        .to_string_lossy()
                        .into()
                })
                .collect()
        };
        assert_eq!(words(&plan.argv), ["/bin/sh", "-c", "echo hi"]);
        let env = words(&plan.envp);
        assert!(env.contains(&"DGLRUN_TEST_PLAN=a=b".to_string()), "{env:?}");
        assert!(!env.iter().any(|e| e.starts_with("PATH=")), "{env:?}");
        assert!(Plan::of(&Command::new("sh")).is_none());
        assert!(Plan::of(Command::new("/bin/sh").arg("a\0b")).is_none());
    }

    #[test]
    fn a_child_is_born_in_the_cgroup_and_a_failed_exec_is_the_error() {
        use std::io::Read;
        use std::os::fd::AsFd;
        let dir = tempfile::tempdir().unwrap();
        let Some(cgroups) = super::super::cgroup::detect_or_skip(&dir.path().join("root")) else {
            return;
        };
        let cg = cgroups.create_job("fork-into-test").unwrap();
        let cwd = OwnedFd::from(std::fs::File::open(dir.path()).unwrap());
        let reaper = super::super::reaper::Reaper::get().unwrap();
        let mut cmd = Command::new("/bin/sh");
        cmd.args(["-c", "pwd; cat /proc/self/cgroup"]);
        let plan = Plan::of(&cmd).unwrap();
        let s = reaper
            .spawn_forked(|| spawn(&plan, cwd.as_fd(), cg.dir_fd()))
            .unwrap();
        let mut out = String::new();
        std::fs::File::from(s.child.stdout)
            .read_to_string(&mut out)
            .unwrap();
        assert_eq!(
            s.exit.blocking_recv().unwrap(),
            super::super::reaper::Exit::Code(0)
        );
        let pwd = dir.path().canonicalize().unwrap();
        assert!(out.starts_with(&format!("{}\n", pwd.display())), "{out}");
        assert!(out.contains("/job-fork-into-test\n"), "{out}");
        let bad = Plan::of(&Command::new("/nonexistent/program")).unwrap();
        match reaper.spawn_forked(|| spawn(&bad, cwd.as_fd(), cg.dir_fd())) {
            Err(ForkError::Failed(e)) => assert_eq!(e.raw_os_error(), Some(libc::ENOENT)),
            Err(e) => panic!("{e}"),
            Ok(s) => panic!("spawned {}", s.child.pid),
        }
    }
}
