//! Containers that read from lazy layers, watched with a deadline: a reader that does
//! not end in time fails the test with the stacks of every task in D state.

// Shared by several test binaries; each uses a part.
#![allow(dead_code)]

use std::process::{Child, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::Result;

use crate::containerd::Containerd;

/// `ctr run --rm --snapshotter lazy-erofs image id args…`, spawned with its output piped.
pub fn spawn(containerd: &Containerd, image: &str, id: &str, args: &[&str]) -> Result<Child> {
    let mut all = vec!["run", "--rm", "--snapshotter", "lazy-erofs", image, id];
    all.extend_from_slice(args);
    Ok(containerd
        .ctr_command(&all)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?)
}

/// Waits for `child` at most `limit`; its output and how long it took. Past the limit the
/// child is killed and the error carries the kernel stacks of tasks in D state and `log`.
pub fn wait_bounded(
    mut child: Child,
    limit: Duration,
    log: impl Fn() -> String,
) -> Result<(Output, Duration)> {
    let started = Instant::now();
    while child.try_wait()?.is_none() {
        if started.elapsed() > limit {
            let _ = child.kill();
            anyhow::bail!(
                "reader still running after {limit:?}; tasks in D state:\n{}\n{}",
                tasks_in_d_state()?,
                log()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok((child.wait_with_output()?, started.elapsed()))
}

/// Name and kernel stack of every task in uninterruptible sleep.
pub fn tasks_in_d_state() -> Result<String> {
    let mut found = String::new();
    for entry in std::fs::read_dir("/proc")?.flatten() {
        let dir = entry.path();
        let Ok(stat) = std::fs::read_to_string(dir.join("stat")) else {
            continue;
        };
        // The state follows the parenthesised command name, which may hold spaces.
        let state = stat
            .rsplit_once(") ")
            .and_then(|(_, rest)| rest.chars().next());
        if state == Some('D') {
            let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
            let stack = std::fs::read_to_string(dir.join("stack")).unwrap_or_default();
            found.push_str(&format!("{} {}{stack}\n", dir.display(), comm));
        }
    }
    Ok(found)
}
