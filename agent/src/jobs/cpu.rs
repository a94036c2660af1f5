//! CPU time of a job's processes, each with its descendants, from `/proc/<pid>/stat`: what
//! tells a coordinator that a silent job still computes. Blocking: reads every process's stat.

use std::collections::HashMap;
use std::path::Path;

use super::proc_stat;
use super::tree::ScanError;

/// One process's place in the tree and the CPU time it and its reaped children used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CpuEntry {
    pub pid: i32,
    pub ppid: i32,
    pub start: Option<u64>,
    /// utime + stime + cutime + cstime, in clock ticks.
    pub ticks: u64,
}

/// Parses `/proc/<pid>/stat` for the tree and the times (fields 4, 14 to 17 and 22).
pub fn parse(text: &str) -> Option<CpuEntry> {
    let base = proc_stat::parse_stat(text)?;
    let close = text.rfind(')')?;
    // After the comm: state (3), ppid (4), ..., utime is field 14, the 12th after the comm.
    let fields: Vec<&str> = text.get(close + 1..)?.split_whitespace().collect();
    let tick = |i: usize| fields.get(i).and_then(|t| t.parse::<u64>().ok());
    let ticks = (11..15).map(tick).sum::<Option<u64>>()?;
    Some(CpuEntry {
        pid: base.pid,
        ppid: base.ppid,
        start: base.start,
        ticks,
    })
}

/// Every process under `proc_root`; ones that vanish while being read are skipped.
pub fn snapshot(proc_root: &Path) -> Result<Vec<CpuEntry>, ScanError> {
    let list_err = |source| ScanError::List {
        path: proc_root.to_path_buf(),
        source,
    };
    let mut out = Vec::new();
    for entry in std::fs::read_dir(proc_root).map_err(list_err)? {
        let entry = entry.map_err(list_err)?;
        let is_pid = entry
            .file_name()
            .to_str()
            .is_some_and(|n| n.parse::<i32>().is_ok());
        if !is_pid {
            continue;
        }
        // A process that exited since the listing is simply not counted.
        if let Ok(text) = std::fs::read_to_string(entry.path().join("stat")) {
            out.extend(parse(&text));
        }
    }
    Ok(out)
}

/// Milliseconds of CPU each seed (pid, start time) and its live descendants used; a seed
/// whose pid now names another process (its start time differs) is left out.
pub fn per_tree(
    all: &[CpuEntry],
    seeds: &[(u32, i32, Option<u64>)],
    tick_hz: u64,
) -> Vec<(u32, u64)> {
    let mut children: HashMap<i32, Vec<&CpuEntry>> = HashMap::new();
    for p in all {
        children.entry(p.ppid).or_default().push(p);
    }
    let by_pid: HashMap<i32, &CpuEntry> = all.iter().map(|p| (p.pid, p)).collect();
    seeds
        .iter()
        .filter_map(|&(index, pid, start)| {
            let top = by_pid.get(&pid)?;
            if start.is_some() && top.start != start {
                return None;
            }
            let mut ticks = 0u64;
            let mut queue = vec![*top];
            while let Some(p) = queue.pop() {
                ticks = ticks.saturating_add(p.ticks);
                queue.extend(children.get(&p.pid).map(Vec::as_slice).unwrap_or(&[]));
            }
            Some((index, ticks.saturating_mul(1000) / tick_hz.max(1)))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(pid: i32, ppid: i32, ticks: u64) -> CpuEntry {
        CpuEntry {
            pid,
            ppid,
            start: Some(pid as u64),
            ticks,
        }
    }

    #[test]
    fn the_times_come_after_the_last_parenthesis() {
        let text = "42 (a (b) c) S 1 42 42 0 -1 4194560 100 0 0 0 7 3 2 1 20 0 1 0 555 0 0";
        let e = parse(text).unwrap();
        assert_eq!((e.pid, e.ppid, e.ticks, e.start), (42, 1, 13, Some(555)));
    }

    #[test]
    fn a_tree_counts_its_descendants_but_not_a_reused_pid() {
        let all = [
            entry(10, 1, 5),
            entry(11, 10, 7),
            entry(12, 11, 1),
            entry(20, 1, 100),
        ];
        let seeds = [(0, 10, Some(10)), (1, 20, Some(99))];
        assert_eq!(per_tree(&all, &seeds, 100), vec![(0, 130)]);
    }
}
