//! Peak memory of the running process, for tests and benches that measure
//! what one job costs (a file of its own so the benches can include it
//! without the rest of the harness).

/// Peak resident set of this process so far, in kB (Linux `VmHWM`; 0 where
/// `/proc` has no such line).
pub fn vm_hwm_kb() -> u64 {
    vm_hwm_kb_of("self")
}

/// Peak resident set so far of the process `/proc/{pid}` names (a pid, or
/// `self`), in kB; 0 where `/proc` has no such line.
pub fn vm_hwm_kb_of(pid: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}
