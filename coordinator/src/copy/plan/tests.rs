use super::*;

const P2: &str = r#"{"graph_name": "g", "num_parts": 2,
    "node_map": {"_N": [[0, 5], [5, 9]]}, "edge_map": {"_E": [[0, 1], [1, 2]]},
    "part-0": {"node_feats": "part0/node_feat.dgl", "edge_feats": "part0/edge_feat.dgl",
               "part_graph": "part0/graph.dgl"},
    "part-1": {"node_feats": "part1/node_feat.dgl", "edge_feats": "part1/edge_feat.dgl",
               "part_graph": "part1/graph.dgl"}}"#;

const IPS2: &str = "10.0.0.1 30050\n10.0.0.2 30050\n";

struct Input<'a> {
    json: &'a str,
    ips: &'a str,
    ws: &'a str,
    rel: &'a str,
    scripts: Option<ScriptFolder>,
}

impl<'a> Input<'a> {
    fn new(json: &'a str, ips: &'a str) -> Self {
        Self {
            json,
            ips,
            ws: "ws",
            rel: "data",
            scripts: None,
        }
    }

    fn ws(mut self, ws: &'a str, rel: &'a str) -> Self {
        self.ws = ws;
        self.rel = rel;
        self
    }

    fn scripts(mut self, files: &[(&str, u32)]) -> Self {
        self.scripts = Some(ScriptFolder {
            name: "code".into(),
            files: files
                .iter()
                .map(|(rel, mode)| ScriptFile {
                    rel: rel.to_string(),
                    local: PathBuf::from("/src/code").join(rel),
                    mode: *mode,
                })
                .collect(),
        });
        self
    }

    fn plan(&self) -> Result<CopyPlan, PlanError> {
        let ip = IpConfig::parse(self.ips, "/in/ip_config.txt").unwrap();
        let pc = PartConfig::parse(self.json, Path::new("/in/out/g.json")).unwrap();
        plan(&PlanInput {
            workspace: self.ws,
            rel_data_path: self.rel,
            ip_config_path: Path::new("/in/ip_config.txt"),
            ip_config: &ip,
            part_config: &pc,
            scripts: self.scripts.as_ref(),
        })
    }
}

/// Every placement as `m<rank> <remote> <- <local or origin> <mode>`, in plan order.
fn render(p: &CopyPlan) -> Vec<String> {
    let mut out = Vec::new();
    for m in &p.machines {
        for f in &m.files {
            let src = &p.sources[f.source];
            let from = match &src.content {
                Content::File(path) => path.display().to_string(),
                Content::Bytes(_) => src.origin.clone(),
            };
            out.push(format!("m{} {} <- {from} {:o}", m.rank, f.remote, f.mode));
        }
    }
    out
}

fn check(input: Input, expected: &[&str]) {
    let p = input.plan().unwrap();
    assert_eq!(render(&p), expected);
}

fn check_err(input: Input, needle: &str) {
    let err = input.plan().unwrap_err().to_string();
    assert!(err.contains(needle), "{err:?} should contain {needle:?}");
}

fn rewritten(p: &CopyPlan) -> Value {
    let src = p
        .sources
        .iter()
        .find(|s| matches!(s.content, Content::Bytes(_)))
        .unwrap();
    let Content::Bytes(b) = &src.content else {
        unreachable!()
    };
    serde_json::from_slice(b).unwrap()
}

#[test]
fn places_files_like_copy_files_py() {
    check(
        Input::new(P2, IPS2).scripts(&[("train.py", 0o755), ("lib/util.py", 0o644)]),
        &[
            "m0 ws/ip_config.txt <- /in/ip_config.txt 644",
            "m0 ws/data/part0/node_feat.dgl <- /in/out/part0/node_feat.dgl 644",
            "m0 ws/data/part0/edge_feat.dgl <- /in/out/part0/edge_feat.dgl 644",
            "m0 ws/data/part0/graph.dgl <- /in/out/part0/graph.dgl 644",
            "m0 ws/data/g.json <- part_config (rewritten) 644",
            "m0 ws/code/train.py <- /src/code/train.py 755",
            "m0 ws/code/lib/util.py <- /src/code/lib/util.py 644",
            "m1 ws/ip_config.txt <- /in/ip_config.txt 644",
            "m1 ws/data/part1/node_feat.dgl <- /in/out/part1/node_feat.dgl 644",
            "m1 ws/data/part1/edge_feat.dgl <- /in/out/part1/edge_feat.dgl 644",
            "m1 ws/data/part1/graph.dgl <- /in/out/part1/graph.dgl 644",
            "m1 ws/data/g.json <- part_config (rewritten) 644",
            "m1 ws/code/train.py <- /src/code/train.py 755",
            "m1 ws/code/lib/util.py <- /src/code/lib/util.py 644",
        ],
    );
}

#[test]
fn normalises_workspace_and_data_path() {
    let one = r#"{"num_parts": 1, "part-0": {"g": "p/graph.dgl"}}"#;
    let ip1 = "10.0.0.1\n";
    check(
        Input::new(one, ip1).ws("./ws/", "./d//x/"),
        &[
            "m0 ws/ip_config.txt <- /in/ip_config.txt 644",
            "m0 ws/d/x/part0/graph.dgl <- /in/out/p/graph.dgl 644",
            "m0 ws/d/x/g.json <- part_config (rewritten) 644",
        ],
    );
    check(
        Input::new(one, ip1).ws("/home/u/ws", "."),
        &[
            "m0 /home/u/ws/ip_config.txt <- /in/ip_config.txt 644",
            "m0 /home/u/ws/part0/graph.dgl <- /in/out/p/graph.dgl 644",
            "m0 /home/u/ws/g.json <- part_config (rewritten) 644",
        ],
    );
    let p = Input::new(one, ip1).ws(".", "").plan().unwrap();
    assert_eq!(p.launch_part_config, "g.json");
    assert_eq!(p.machines[0].files[0].remote, "ip_config.txt");
}

#[test]
fn rewritten_part_config_is_relative_to_where_it_lands() {
    let p = Input::new(P2, IPS2).plan().unwrap();
    let doc = rewritten(&p);
    assert_eq!(doc["part-1"]["part_graph"], "part1/graph.dgl");
    assert_eq!(doc["part-0"]["node_feats"], "part0/node_feat.dgl");
    // Everything else is kept as it was.
    assert_eq!(doc["node_map"]["_N"][1][0], 5);
    assert_eq!(doc["graph_name"], "g");
    assert_eq!(p.launch_part_config, "data/g.json");
    assert_eq!(p.launch_ip_config, "ip_config.txt");
    // One JSON for every machine.
    let pcs: Vec<usize> = p
        .machines
        .iter()
        .flat_map(|m| {
            m.files
                .iter()
                .filter(|f| f.remote.ends_with("g.json"))
                .map(|f| f.source)
        })
        .collect();
    assert_eq!(pcs.len(), 2);
    assert_eq!(pcs[0], pcs[1]);
}

#[test]
fn every_path_valued_key_of_a_part_is_sent_and_rewritten() {
    let json = r#"{"num_parts": 1, "node_map": "maps/node_map.npy", "edge_map": "maps/edge_map.npy",
        "part-0": {"node_feats": "x/p0/n.dgl", "gb": {"graph": "x/p0/fused.pt"}, "list": ["x/p0/a", "x/p0/b"], "n": 3}}"#;
    let input = Input::new(json, "10.0.0.1\n");
    check(
        Input::new(json, "10.0.0.1\n"),
        &[
            "m0 ws/ip_config.txt <- /in/ip_config.txt 644",
            "m0 ws/data/node_map.npy <- /in/out/maps/node_map.npy 644",
            "m0 ws/data/edge_map.npy <- /in/out/maps/edge_map.npy 644",
            "m0 ws/data/part0/n.dgl <- /in/out/x/p0/n.dgl 644",
            "m0 ws/data/part0/fused.pt <- /in/out/x/p0/fused.pt 644",
            "m0 ws/data/part0/a <- /in/out/x/p0/a 644",
            "m0 ws/data/part0/b <- /in/out/x/p0/b 644",
            "m0 ws/data/g.json <- part_config (rewritten) 644",
        ],
    );
    let doc = rewritten(&input.plan().unwrap());
    assert_eq!(doc["node_map"], "node_map.npy");
    assert_eq!(doc["edge_map"], "edge_map.npy");
    assert_eq!(doc["part-0"]["gb"]["graph"], "part0/fused.pt");
    assert_eq!(doc["part-0"]["list"][1], "part0/b");
    assert_eq!(doc["part-0"]["n"], 3);
}

#[test]
fn a_file_named_twice_is_one_source() {
    let json = r#"{"num_parts": 2, "part-0": {"a": "shared.bin", "b": "p0/x"}, "part-1": {"a": "shared.bin"}}"#;
    let p = Input::new(json, IPS2).plan().unwrap();
    let shared: Vec<usize> = p
        .machines
        .iter()
        .flat_map(|m| {
            m.files
                .iter()
                .filter(|f| f.remote.ends_with("shared.bin"))
                .map(|f| f.source)
        })
        .collect();
    assert_eq!(shared.len(), 2);
    assert_eq!(shared[0], shared[1]);
    assert_eq!(p.machines[1].files[1].remote, "ws/data/part1/shared.bin");
}

#[test]
fn refuses_bad_input_naming_it() {
    check_err(
        Input::new(P2, "10.0.0.1\n10.0.0.2\n10.0.0.3\n"),
        "/in/out/g.json has num_parts 2 but /in/ip_config.txt lists 3 machine(s)",
    );
    let abs = r#"{"num_parts": 1, "part-0": {"node_feats": "/etc/passwd"}}"#;
    check_err(
        Input::new(abs, "10.0.0.1\n"),
        "/in/out/g.json: part-0.node_feats is \"/etc/passwd\", an absolute path",
    );
    let up = r#"{"num_parts": 1, "part-0": {"g": {"x": "p0/../../secret"}}}"#;
    check_err(
        Input::new(up, "10.0.0.1\n"),
        "part-0.g.x is \"p0/../../secret\", a path with `..`",
    );
    let map = r#"{"num_parts": 1, "node_map": "../nm.npy", "part-0": {}}"#;
    check_err(Input::new(map, "10.0.0.1\n"), "node_map is \"../nm.npy\"");
    let empty = r#"{"num_parts": 1, "part-0": {"g": ""}}"#;
    check_err(
        Input::new(empty, "10.0.0.1\n"),
        "part-0.g is \"\", an empty path",
    );
    check_err(
        Input::new(P2, IPS2).ws("ws", "../up"),
        "--rel_data_path \"../up\": must not contain `..`",
    );
    check_err(
        Input::new(P2, IPS2).ws("ws", "/abs"),
        "--rel_data_path \"/abs\": must be relative",
    );
    check_err(
        Input::new(P2, IPS2).ws("a/../../b", "d"),
        "--workspace \"a/../../b\": must not contain `..`",
    );
    check_err(
        Input::new(P2, IPS2).ws("", "d"),
        "--workspace \"\": must not be empty",
    );
}

#[test]
fn refuses_two_files_at_one_place() {
    let json = r#"{"num_parts": 1, "part-0": {"a": "x/graph.dgl", "b": "y/graph.dgl"}}"#;
    check_err(
        Input::new(json, "10.0.0.1\n"),
        "part-0.a and part-0.b would both land at ws/data/part0/graph.dgl on machine 0",
    );
    let json = r#"{"num_parts": 1, "node_map": "m/g.json", "part-0": {}}"#;
    check_err(
        Input::new(json, "10.0.0.1\n"),
        "node_map and part_config (rewritten) would both land at ws/data/g.json",
    );
    // The script folder named like the data path.
    let one = r#"{"num_parts": 1, "part-0": {"g": "p/graph.dgl"}}"#;
    check_err(
        Input::new(one, "10.0.0.1\n")
            .ws("ws", "code")
            .scripts(&[("g.json", 0o644)]),
        "would both land at ws/code/g.json",
    );
}

#[test]
fn remote_join_cases() {
    for (pieces, expected) in [
        (&["ws", "data"][..], "ws/data"),
        (&["./ws/", "", "."][..], "ws"),
        (&["/abs//ws", "d"][..], "/abs/ws/d"),
        (&["", ""][..], "."),
        (&["/"][..], "/"),
    ] {
        assert_eq!(remote_join(pieces), expected, "{pieces:?}");
    }
}

#[test]
fn a_path_with_dot_dot_that_stays_inside_is_accepted() {
    let json = r#"{"num_parts": 1, "part-0": {"part_graph": "part0/../part0/graph.dgl"}}"#;
    let p = Input::new(json, "10.0.0.1\n").plan().unwrap();
    assert_eq!(rewritten(&p)["part-0"]["part_graph"], "part0/graph.dgl");
    let up = r#"{"num_parts": 1, "part-0": {"g": "p0/../../x/g.dgl"}}"#;
    check_err(Input::new(up, "10.0.0.1\n"), "leaves the directory");
}

#[test]
fn a_workspace_with_an_unexpanded_tilde_is_refused() {
    check_err(
        Input::new(P2, IPS2).ws("~/dglrun/x", "data"),
        "--workspace '~/dglrun/x': the `~` was not expanded",
    );
}
