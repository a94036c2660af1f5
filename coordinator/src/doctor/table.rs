//! The doctor's report as text: one row per host, a column per check, then what to do about
//! each problem, host by host.

use super::{HostReport, Status};

fn cell(status: Status, detail: &str) -> String {
    match status {
        Status::Ok => detail.to_string(),
        Status::Warn => format!("WARN {detail}"),
        Status::Fail => format!("FAIL {detail}"),
        Status::Unknown => "-".to_string(),
    }
}

pub fn render(reports: &[HostReport]) -> String {
    let mut rows: Vec<Vec<String>> = vec![[
        "host",
        "agent",
        "interface",
        "python",
        "gpus",
        "disk",
        "ports",
        "partition",
    ]
    .map(String::from)
    .to_vec()];
    for r in reports {
        let mut row = vec![format!("m{} {}", r.machine, r.ip)];
        row.extend(r.checks().iter().map(|(_, c)| cell(c.status, &c.detail)));
        rows.push(row);
    }
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in &rows {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    let mut todo = Vec::new();
    for r in reports {
        for (name, c) in r.checks() {
            if let Some(fix) = &c.fix {
                let what = if c.status == Status::Fail {
                    "FAIL"
                } else {
                    "WARN"
                };
                todo.push(format!("m{} {} {name}: {what}: {fix}", r.machine, r.ip));
            }
        }
    }
    if todo.is_empty() {
        out.push_str("\nevery check passed\n");
    } else {
        out.push_str("\nto do:\n");
        for t in todo {
            out.push_str(&format!("  {t}\n"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::Check;
    use super::*;

    fn report(machine: usize) -> HostReport {
        HostReport {
            machine,
            ip: format!("10.0.0.{}", machine + 1).parse().unwrap(),
            agent: Check::ok("0.1.0 (protocol 4), clock +3 ms"),
            interface: Check::ok("eth1"),
            python: Check::ok("/opt/conda/envs/dgl/bin/python 3.10.14, dgl 2.1.0, torch 2.2.1"),
            gpus: Check::ok("4"),
            disk: Check::ok("root 812.4 GiB free, /dev/shm 125.9 GiB free, partition 3.2 GiB"),
            ports: Check::ok("30050 free"),
            partition: Check::ok("5 files verified"),
        }
    }

    #[test]
    fn the_table_and_what_to_do() {
        let mut bad = report(1);
        bad.interface = Check::bad(
            Status::Fail,
            "10.0.0.2 on no interface",
            "the host's addresses are lo 127.0.0.1; eth0 10.9.0.2; DGL finds its machine by its \
             ip_config address: put one of them in ip_config",
        );
        bad.python = Check::bad(
            Status::Fail,
            "/usr/bin/python3 3.11.2, dgl missing, torch 2.2.1",
            "/usr/bin/python3 cannot import dgl (dgl: ModuleNotFoundError: No module named \
             'dgl'): install it there, or point --python / --setup at the environment that has it",
        );
        bad.gpus = Check::ok("none (no nvidia-smi)");
        bad.partition = Check::bad(
            Status::Fail,
            "2 of 5 files missing or different",
            "such as ws/data/part1/graph.dgl, ws/data/part1/node_feat.dgl: run dgl-coord copy \
             with the same --workspace, --rel_data_path and --part_config",
        );
        bad.ports = Check::bad(
            Status::Fail,
            "held: 30050 by pid 4242 (python3 train_dist.py --graph_name g)",
            "a server of an earlier job? stop it (dgl-coord kill --ip_config ..., or kill the \
             pid) or use other ports in ip_config",
        );
        let mut gone = report(2);
        gone.agent = Check::bad(
            Status::Fail,
            "unreachable",
            "agent of machine 2 at 10.0.0.3:47001 is unreachable: connection refused",
        );
        for c in [
            &mut gone.interface,
            &mut gone.python,
            &mut gone.gpus,
            &mut gone.disk,
            &mut gone.ports,
            &mut gone.partition,
        ] {
            *c = Check::unknown();
        }
        insta::assert_snapshot!(render(&[report(0), bad, gone]));
    }
}
