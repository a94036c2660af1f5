//! The plan against DGL's real behaviour (`integration-tests/fixtures/dgl-compat/launch_cases.json`) and the rules
//! launch.py applies that the cases do not exercise.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::*;
use crate::config::IpConfig;

const CASES: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../integration-tests/fixtures/dgl-compat/launch_cases.json"
);
const PORT: u16 = 41234;
const WORKSPACE: &str = "/home/u/graphsage";

#[derive(Deserialize)]
struct Case {
    name: String,
    num_trainers: u32,
    num_samplers: u32,
    num_servers: u32,
    extra_envs: Vec<String>,
    num_omp_threads: u32,
    ip_config: Vec<String>,
    udf_command: String,
    part_config: String,
    graph_format: String,
    num_server_threads: u32,
    processes: Vec<Expected>,
}

#[derive(Deserialize, Debug, PartialEq, Eq, PartialOrd, Ord, Clone)]
struct Expected {
    machine: usize,
    role: String,
    env: BTreeMap<String, String>,
    command: String,
}

fn options(c: &Case, mode: TrainerMode) -> LaunchOptions {
    LaunchOptions {
        workspace: WORKSPACE.into(),
        num_trainers: c.num_trainers,
        num_samplers: c.num_samplers,
        num_servers: c.num_servers,
        part_config: c.part_config.clone(),
        ip_config: "ip_config.txt".into(),
        num_server_threads: c.num_server_threads,
        num_omp_threads: Some(c.num_omp_threads),
        graph_format: c.graph_format.clone(),
        extra_envs: c
            .extra_envs
            .iter()
            .map(|kv| {
                let (k, v) = kv.split_once('=').unwrap();
                (k.to_string(), v.to_string())
            })
            .collect(),
        udf_command: c.udf_command.clone(),
        trainer_mode: mode,
        trainers_per_host: None,
        gpus_per_trainer: None,
        trainers_from_gpus: false,
        setup: None,
        python: None,
        omp_per_host: false,
    }
}

fn facts(ip_lines: &[String]) -> ClusterFacts {
    ClusterFacts {
        machines: IpConfig::parse(&ip_lines.join("\n"), "case")
            .unwrap()
            .machines,
        master_port: Some(PORT),
        pythonpath: None,
        omp_num_threads_env: None,
        cpu_count: 8,
        job_id: "job-1".into(),
        hosts: Vec::new(),
    }
}

fn load_cases() -> Vec<Case> {
    let text = std::fs::read_to_string(CASES).unwrap_or_else(|e| panic!("{CASES}: {e}"));
    serde_json::from_str(&text).unwrap()
}

#[test]
fn plan_matches_dgl_for_every_compat_case() {
    let cases = load_cases();
    assert!(!cases.is_empty());
    for c in &cases {
        let planned = plan(&options(c, TrainerMode::Torchrun), &facts(&c.ip_config))
            .unwrap_or_else(|e| panic!("{}: {e}", c.name));
        let mut got: Vec<Expected> = planned
            .iter()
            .map(|p| {
                // dglrun's one addition to DGL's environment: torchrun's error file.
                let mut env = p.env.clone();
                let file = env.remove(TORCHELASTIC_ERROR_FILE);
                let want =
                    (p.role == Role::TrainerGroup).then(|| torchrun_error_file("job-1", p.machine));
                assert_eq!(file, want, "{}", c.name);
                Expected {
                    machine: p.machine,
                    role: p.role.as_str().to_string(),
                    env,
                    command: p.command.display(),
                }
            })
            .collect();
        let mut want: Vec<Expected> = c
            .processes
            .iter()
            .map(|e| Expected {
                command: e
                    .command
                    .replace("<PORT>", &PORT.to_string())
                    .replace("<WORKSPACE>", WORKSPACE),
                ..e.clone()
            })
            .collect();
        got.sort();
        want.sort();
        assert_eq!(got.len(), want.len(), "{}: process count", c.name);
        for (g, w) in got.iter().zip(&want) {
            assert_eq!(g, w, "case {}", c.name);
        }
        // Labels are unique per machine: they name processes in logs.
        let mut labels: Vec<(usize, &str)> = planned
            .iter()
            .map(|p| (p.machine, p.label.as_str()))
            .collect();
        labels.sort();
        labels.dedup();
        assert_eq!(labels.len(), planned.len(), "{}", c.name);
    }
}

#[test]
fn shell_chains_run_under_sh_and_plain_commands_as_argv() {
    let cases = load_cases();
    for c in &cases {
        let planned = plan(&options(c, TrainerMode::Torchrun), &facts(&c.ip_config)).unwrap();
        for p in planned {
            let is_shell = matches!(p.command, CommandLine::Shell(_));
            assert_eq!(
                is_shell,
                c.udf_command.contains("&&"),
                "{}: {:?}",
                c.name,
                p.command
            );
        }
    }
}

fn simple_options() -> LaunchOptions {
    LaunchOptions {
        workspace: WORKSPACE.into(),
        num_trainers: 2,
        num_samplers: 1,
        num_servers: 1,
        part_config: "data/g.json".into(),
        ip_config: "ip_config.txt".into(),
        num_server_threads: 1,
        num_omp_threads: None,
        graph_format: "csc".into(),
        extra_envs: vec![],
        udf_command: "python3 train.py".into(),
        trainer_mode: TrainerMode::Direct,
        trainers_per_host: None,
        gpus_per_trainer: None,
        trainers_from_gpus: false,
        setup: None,
        python: None,
        omp_per_host: false,
    }
}

fn two_machines() -> ClusterFacts {
    facts(&["10.0.0.1 30050".to_string(), "10.0.0.2".to_string()])
}

#[test]
fn direct_mode_gives_each_trainer_torchruns_worker_environment() {
    let planned = plan(&simple_options(), &two_machines()).unwrap();
    let t = planned
        .iter()
        .find(|p| p.machine == 1 && p.label == "trainer1")
        .unwrap();
    assert_eq!(t.role, Role::Trainer);
    assert_eq!(
        t.command,
        CommandLine::Argv(vec!["python3".into(), "train.py".into()])
    );
    let want: BTreeMap<String, String> = [
        ("DGL_DIST_MODE", "distributed"),
        ("DGL_ROLE", "client"),
        ("DGL_NUM_SAMPLER", "1"),
        ("DGL_NUM_CLIENT", "8"),
        ("DGL_CONF_PATH", "data/g.json"),
        ("DGL_IP_CONFIG", "ip_config.txt"),
        ("DGL_NUM_SERVER", "1"),
        ("DGL_GRAPH_FORMAT", "csc"),
        ("OMP_NUM_THREADS", "2"),
        ("DGL_GROUP_ID", "0"),
        ("RANK", "3"),
        ("LOCAL_RANK", "1"),
        ("WORLD_SIZE", "4"),
        ("LOCAL_WORLD_SIZE", "2"),
        ("GROUP_RANK", "1"),
        ("GROUP_WORLD_SIZE", "2"),
        ("ROLE_RANK", "3"),
        ("ROLE_WORLD_SIZE", "4"),
        ("ROLE_NAME", "default"),
        ("MASTER_ADDR", "10.0.0.1"),
        ("MASTER_PORT", "41234"),
        ("TORCHELASTIC_RUN_ID", "job-1"),
        ("TORCHELASTIC_RESTART_COUNT", "0"),
        ("TORCHELASTIC_MAX_RESTARTS", "0"),
        ("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    assert_eq!(t.env, want);
    let labels: Vec<String> = planned
        .iter()
        .map(|p| format!("m{} {}", p.machine, p.label))
        .collect();
    assert_eq!(
        labels,
        [
            "m0 server0",
            "m1 server0",
            "m0 trainer0",
            "m0 trainer1",
            "m1 trainer0",
            "m1 trainer1"
        ]
    );
}

#[test]
fn launcher_environment_is_passed_on_as_dgl_does() {
    let mut f = two_machines();
    f.pythonpath = Some("/opt/lib".into());
    f.omp_num_threads_env = Some("7".into());
    let mut o = simple_options();
    o.num_omp_threads = Some(3);
    o.extra_envs = vec![
        ("DGL_ROLE".into(), "ignored".into()),
        ("LD_LIBRARY_PATH".into(), "/x:$LD_LIBRARY_PATH".into()),
    ];
    let planned = plan(&o, &f).unwrap();
    for p in &planned {
        assert_eq!(p.env["PYTHONPATH"], "/opt/lib");
        assert_eq!(p.env["LD_LIBRARY_PATH"], "/x:$LD_LIBRARY_PATH");
        assert_ne!(p.env["DGL_ROLE"], "ignored", "DGL's own variables win");
        let omp = if p.role == Role::Server { "1" } else { "7" };
        assert_eq!(p.env["OMP_NUM_THREADS"], omp, "{}", p.label);
    }
}

#[test]
fn defaults_and_refusals() {
    assert_eq!(default_omp_threads(2, 2), 1);
    assert_eq!(default_omp_threads(64, 4), 8);
    assert_eq!(default_omp_threads(1, 1), 1);
    let mut f = two_machines();
    f.master_port = None;
    let mut o = simple_options();
    o.trainer_mode = TrainerMode::Torchrun;
    let planned = plan(&o, &f).unwrap();
    assert!(planned[2]
        .command
        .display()
        .contains("--master_port=<PORT> train.py"));
    o.udf_command = "./run.sh".into();
    assert!(matches!(plan(&o, &f), Err(PlanError::Torchrun(_))));
    o.num_trainers = 0;
    assert_eq!(plan(&o, &f), Err(PlanError::Zero("--num_trainers")));
}

fn three_machines() -> ClusterFacts {
    facts(&[
        "10.0.0.1".to_string(),
        "10.0.0.2".to_string(),
        "10.0.0.3".to_string(),
    ])
}

/// One heterogeneous case: per-host counts and samplers, and what every trainer must get,
/// `(machine, label, RANK, LOCAL_RANK, LOCAL_WORLD_SIZE)`, plus WORLD_SIZE and DGL_NUM_CLIENT.
struct HostCase {
    counts: &'static [u32],
    samplers: u32,
    world: usize,
    num_client: usize,
    trainers: &'static [(usize, &'static str, usize, u32, u32)],
}

const HOST_CASES: &[HostCase] = &[
    HostCase {
        counts: &[2, 2, 1],
        samplers: 0,
        world: 5,
        num_client: 5,
        trainers: &[
            (0, "trainer0", 0, 0, 2),
            (0, "trainer1", 1, 1, 2),
            (1, "trainer0", 2, 0, 2),
            (1, "trainer1", 3, 1, 2),
            (2, "trainer0", 4, 0, 1),
        ],
    },
    HostCase {
        counts: &[1, 3, 2],
        samplers: 2,
        world: 6,
        num_client: 18,
        trainers: &[
            (0, "trainer0", 0, 0, 1),
            (1, "trainer0", 1, 0, 3),
            (1, "trainer1", 2, 1, 3),
            (1, "trainer2", 3, 2, 3),
            (2, "trainer0", 4, 0, 2),
            (2, "trainer1", 5, 1, 2),
        ],
    },
    // A uniform list is the same as --num_trainers.
    HostCase {
        counts: &[1, 1, 1],
        samplers: 1,
        world: 3,
        num_client: 6,
        trainers: &[
            (0, "trainer0", 0, 0, 1),
            (1, "trainer0", 1, 0, 1),
            (2, "trainer0", 2, 0, 1),
        ],
    },
];

#[test]
fn per_host_trainer_counts_give_global_contiguous_ranks_in_direct_mode() {
    let f = three_machines();
    for case in HOST_CASES {
        let mut o = simple_options();
        o.num_trainers = 0; // ignored when per-host counts are given
        o.num_samplers = case.samplers;
        o.trainers_per_host = Some(case.counts.to_vec());
        let planned = plan(&o, &f).unwrap_or_else(|e| panic!("{:?}: {e}", case.counts));
        let servers: Vec<&PlannedProcess> =
            planned.iter().filter(|p| p.role == Role::Server).collect();
        assert_eq!(servers.len(), 3, "{:?}", case.counts);
        let trainers: Vec<&PlannedProcess> =
            planned.iter().filter(|p| p.role == Role::Trainer).collect();
        assert_eq!(trainers.len(), case.trainers.len(), "{:?}", case.counts);
        for p in planned.iter() {
            assert_eq!(
                p.env["DGL_NUM_CLIENT"],
                case.num_client.to_string(),
                "{:?} {}",
                case.counts,
                p.label
            );
        }
        for (t, &(machine, label, rank, local, local_world)) in trainers.iter().zip(case.trainers) {
            let what = format!("{:?} m{} {}", case.counts, t.machine, t.label);
            assert_eq!((t.machine, t.label.as_str()), (machine, label), "{what}");
            let env = |k: &str| t.env[k].clone();
            assert_eq!(env("RANK"), rank.to_string(), "{what}");
            assert_eq!(env("ROLE_RANK"), rank.to_string(), "{what}");
            assert_eq!(env("LOCAL_RANK"), local.to_string(), "{what}");
            assert_eq!(env("LOCAL_WORLD_SIZE"), local_world.to_string(), "{what}");
            assert_eq!(env("WORLD_SIZE"), case.world.to_string(), "{what}");
            assert_eq!(env("ROLE_WORLD_SIZE"), case.world.to_string(), "{what}");
            assert_eq!(env("GROUP_RANK"), machine.to_string(), "{what}");
            assert_eq!(env("GROUP_WORLD_SIZE"), "3", "{what}");
            // fake_dgl.py's rule, and DGL's: every trainer and sampler is a client.
            assert_eq!(
                case.world * (1 + case.samplers as usize),
                case.num_client,
                "{what}"
            );
            // DGL's default OMP threads, divided by this host's count (8 CPUs).
            assert_eq!(
                env("OMP_NUM_THREADS"),
                default_omp_threads(8, local_world).to_string(),
                "{what}"
            );
        }
    }
}

#[test]
fn per_host_counts_are_checked_and_refused_in_torchrun_mode_when_they_differ() {
    let f = three_machines();
    let mut o = simple_options();
    o.trainers_per_host = Some(vec![2, 1]);
    let err = plan(&o, &f).unwrap_err().to_string();
    assert!(
        err.contains("gives 2 counts but ip_config lists 3"),
        "{err}"
    );
    o.trainers_per_host = Some(vec![2, 0, 1]);
    let err = plan(&o, &f).unwrap_err().to_string();
    assert!(err.contains("machine 1 has 0 trainers"), "{err}");

    o.trainer_mode = TrainerMode::Torchrun;
    o.trainers_per_host = Some(vec![2, 2, 1]);
    let err = plan(&o, &f).unwrap_err().to_string();
    assert!(
        err.contains("2,2,1") && err.contains("--trainer-mode direct"),
        "{err}"
    );
    // Equal counts are just --num_trainers, torchrun mode included.
    o.trainers_per_host = Some(vec![3, 3, 3]);
    let listed = plan(&o, &f).unwrap();
    o.trainers_per_host = None;
    o.num_trainers = 3;
    assert_eq!(listed, plan(&o, &f).unwrap());
    assert!(listed[3].command.display().contains("--nproc_per_node=3"));
}

/// The torchrun wrap goes after the first python interpreter in command position, found by
/// reading the command as shell words: never into an argument that merely contains "python".
#[test]
fn torchrun_wraps_the_interpreter_in_command_position() {
    let f = two_machines();
    let mut o = simple_options();
    o.trainer_mode = TrainerMode::Torchrun;
    let tr = "-m torch.distributed.run --nproc_per_node=2 --nnodes=2 --node_rank=0 \
              --master_addr=10.0.0.1 --master_port=41234";
    let trainer_command = |o: &LaunchOptions| {
        plan(o, &f).map(|p| {
            p.into_iter()
                .find(|p| p.role == Role::TrainerGroup && p.machine == 0)
                .unwrap()
                .command
                .display()
        })
    };
    for (given, want) in [
        (
            "cd /opt/python3 && python3 train.py",
            format!("cd /opt/python3 && python3 {tr} train.py"),
        ),
        ("FOO=1 python3 x.py", format!("FOO=1 python3 {tr} x.py")),
        (
            "env A=1 /usr/bin/python3.11 x.py",
            format!("env A=1 /usr/bin/python3.11 {tr} x.py"),
        ),
        (
            "echo python3; exec python3 'a b.py'",
            format!("echo python3; exec python3 {tr} 'a b.py'"),
        ),
        (
            "cat python3 | python x.py --python3",
            format!("cat python3 | python {tr} x.py --python3"),
        ),
        (
            "env -u X B=2 python3 -u x.py",
            format!("env -u X B=2 python3 {tr} -u x.py"),
        ),
        (
            "cd 'my python3' && nohup python3 t.py",
            format!("cd 'my python3' && nohup python3 {tr} t.py"),
        ),
    ] {
        o.udf_command = given.into();
        assert_eq!(trainer_command(&o).unwrap(), want, "{given}");
    }
    for refused in [
        "./train.sh python3",
        "cd /opt/python3 && ./run.sh",
        "echo 'python3 x.py'",
        "ls /usr/bin/python3",
        "VAR=python3 ./x",
    ] {
        o.udf_command = refused.into();
        let err = trainer_command(&o).unwrap_err().to_string();
        assert!(
            err.contains("no python interpreter in command position"),
            "{refused}: {err}"
        );
    }
}

#[test]
fn every_trainer_and_sampler_is_a_client_of_every_server() {
    for (world, samplers, clients) in [(1, 0, 1), (4, 0, 4), (4, 2, 12), (0, 3, 0)] {
        assert_eq!(
            super::num_client(world, samplers),
            clients,
            "{world} trainers, {samplers} samplers each"
        );
    }
}

#[test]
fn each_host_gets_its_interface_unless_the_user_or_the_agent_set_it() {
    use crate::launch::host_env::HostFacts;
    let mut f = two_machines();
    f.hosts = vec![
        HostFacts {
            socket_ifname: Some("eth1".into()),
            agent_env: vec![],
            cpus: None,
        },
        HostFacts {
            socket_ifname: Some("ib0".into()),
            agent_env: vec!["NCCL_SOCKET_IFNAME".into()],
            cpus: None,
        },
    ];
    let mut o = simple_options();
    o.extra_envs = vec![("TP_SOCKET_IFNAME".into(), "bond0".into())];
    let planned = plan(&o, &f).unwrap();
    for p in &planned {
        let get = |k: &str| p.env.get(k).map(String::as_str);
        let own = if p.machine == 0 { "eth1" } else { "ib0" };
        assert_eq!(get("GLOO_SOCKET_IFNAME"), Some(own), "{p:?}");
        assert_eq!(get("TP_SOCKET_IFNAME"), Some("bond0"), "{p:?}");
        let nccl = (p.machine == 0).then_some("eth1");
        assert_eq!(get("NCCL_SOCKET_IFNAME"), nccl, "{p:?}");
    }
    assert!(overridden_extra_envs(&o, &planned).is_empty());
}

#[test]
fn each_direct_trainer_gets_its_own_gpus() {
    let mut o = simple_options();
    o.num_trainers = 2;
    o.gpus_per_trainer = Some(2);
    let planned = plan(&o, &two_machines()).unwrap();
    let devices = |m: usize, label: &str| {
        planned
            .iter()
            .find(|p| p.machine == m && p.label == label)
            .and_then(|p| p.env.get("CUDA_VISIBLE_DEVICES").cloned())
    };
    assert_eq!(devices(1, "trainer0").as_deref(), Some("0,1"));
    assert_eq!(devices(1, "trainer1").as_deref(), Some("2,3"));
    assert_eq!(devices(0, "server0"), None);
    o.trainer_mode = TrainerMode::Torchrun;
    let planned = plan(&o, &two_machines()).unwrap();
    assert!(planned
        .iter()
        .all(|p| !p.env.contains_key("CUDA_VISIBLE_DEVICES")));
}

#[test]
fn host_omp_threads_divide_each_hosts_own_cpus_by_its_trainers() {
    use crate::launch::host_env::HostFacts;
    let mut f = two_machines();
    f.hosts = [64, 6]
        .map(|n| HostFacts {
            cpus: Some(n),
            ..HostFacts::default()
        })
        .to_vec();
    let mut o = simple_options();
    o.trainers_per_host = Some(vec![4, 4]);
    o.omp_per_host = true;
    let planned = plan(&o, &f).unwrap();
    let omp = |m: usize| {
        planned
            .iter()
            .find(|p| p.machine == m && p.role == Role::Trainer)
            .map(|p| p.env["OMP_NUM_THREADS"].clone())
    };
    assert_eq!(
        (omp(0).as_deref(), omp(1).as_deref()),
        (Some("16"), Some("1"))
    );
}
