//! Running a shell command for the `command` and `case-command` steps:
//! `sh -c`, its own process group (so Ctrl-C stops all of it), killed if
//! tsdistill dies, output kept in a log whose tail is shown on failure.

use std::collections::BTreeMap;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use super::{StepError, StepResult};
use crate::exec::CancelToken;

/// Environment variable name for a step or param name (`train@weak` → `TRAIN_WEAK`).
pub fn env_name(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect()
}

/// `params:` values as `TSD_PARAM_<NAME>` (lists joined by spaces).
pub fn param_env(params: &serde_json::Map<String, Value>) -> BTreeMap<String, String> {
    params
        .iter()
        .map(|(k, v)| {
            let text = match v {
                Value::String(s) => s.clone(),
                Value::Array(a) => a
                    .iter()
                    .map(|x| {
                        x.as_str()
                            .map(str::to_string)
                            .unwrap_or_else(|| x.to_string())
                    })
                    .collect::<Vec<_>>()
                    .join(" "),
                other => other.to_string(),
            };
            (format!("TSD_PARAM_{}", env_name(k)), text)
        })
        .collect()
}

/// Runs `script` with `sh -c` in `cwd`; the log goes to `log`.
pub fn run(
    script: &str,
    cwd: &Path,
    env: &BTreeMap<String, String>,
    log: &Path,
    cancel: &CancelToken,
) -> StepResult<()> {
    let log_file = fs_err::File::create(log)?.into_parts().0;
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(script)
        .current_dir(cwd)
        .envs(env)
        .stdin(Stdio::null());
    cmd.stdout(Stdio::from(log_file.try_clone()?))
        .stderr(Stdio::from(log_file));
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::setpgid(0, 0);
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| StepError::Other(format!("cannot start `sh -c {script}`: {e}")))?;
    let pid = child.id() as i32;
    loop {
        if let Some(status) = child.try_wait()? {
            if status.success() {
                return Ok(());
            }
            let text = std::fs::read_to_string(log).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(15).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            return Err(StepError::Other(format!(
                "command failed ({status}): {script}\n{}\n(full log: {})",
                tail.iter()
                    .map(|l| format!("    | {l}"))
                    .collect::<Vec<_>>()
                    .join("\n"),
                log.display()
            )));
        }
        if cancel.is_cancelled() {
            // SAFETY: signalling the child's own process group.
            unsafe { libc::kill(-pid, libc::SIGTERM) };
            std::thread::sleep(Duration::from_millis(200));
            unsafe { libc::kill(-pid, libc::SIGKILL) };
            let _ = child.wait();
            return Err(StepError::Other("interrupted".into()));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Checks that each declared output exists under `dir`.
pub fn check_outs(dir: &Path, outs: &[String]) -> StepResult<()> {
    for o in outs {
        if !dir.join(o).exists() {
            return Err(StepError::Other(format!(
                "the command did not write its declared output `{o}` (into $TSD_OUT)"
            )));
        }
    }
    Ok(())
}
