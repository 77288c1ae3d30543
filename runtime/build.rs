//! Build-time work for the runtime, so that nothing a user's step depends on
//! can fail to compile at run time:
//! - the seccomp profile in `seccomp-profiles/` is validated with
//!   seccompiler and compiled to one compact BPF program (see `bpf`); a
//!   profile that does not compile fails the build;
//! - `init/init.c`, the sandbox's PID 1, is compiled into a tiny static
//!   binary (no libc) that the runtime embeds and executes from a sealed
//!   memfd.

use std::env;
use std::fs;
use std::path::PathBuf;
use std::process::Command;

fn main() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let out = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR"));
    compile_seccomp(&manifest, &out);
    compile_init(&manifest, &out);
}

fn compile_seccomp(manifest: &std::path::Path, out: &std::path::Path) {
    let profile = manifest.join("../seccomp-profiles/default.json");
    println!("cargo:rerun-if-changed={}", profile.display());
    let arch = env::var("CARGO_CFG_TARGET_ARCH").expect("CARGO_CFG_TARGET_ARCH");
    let target: seccompiler::TargetArch = arch
        .as_str()
        .try_into()
        .unwrap_or_else(|_| panic!("seccomp profiles cannot be compiled for {arch}"));
    let file = fs::File::open(&profile).unwrap_or_else(|e| panic!("{}: {e}", profile.display()));
    let map = seccompiler::compile_from_json(file, target).unwrap_or_else(|e| {
        panic!(
            "seccomp profile {} does not compile: {e}",
            profile.display()
        )
    });
    // seccompiler validated the profile (names, argument syntax); kiln
    // compiles it itself into one compact program, see `bpf` below.
    let _ = map;
    let json: serde_json::Value =
        serde_json::from_slice(&fs::read(&profile).expect("read profile"))
            .expect("profile is JSON");
    let prog = bpf::compile(&json, target, &arch);
    let mut bytes = Vec::with_capacity(prog.len() * 8);
    for ins in &prog {
        bytes.extend_from_slice(&ins.0.to_ne_bytes());
        bytes.push(ins.1);
        bytes.push(ins.2);
        bytes.extend_from_slice(&ins.3.to_ne_bytes());
    }
    fs::write(out.join("seccomp-default.bpf"), bytes).expect("write bpf");
}

/// A compact BPF compiler for kiln's profile format.
///
/// seccompiler emits one linear chain per syscall: a syscall numbered N runs
/// through about 2N instructions, and the kernel's seccomp action cache
/// (which emulates the filter once for every syscall number when it is
/// installed) then costs milliseconds per step. This compiler emits one
/// program: the architecture check, the x32 check, a binary search over
/// ranges of syscall numbers that share an answer, and short argument checks
/// for the few conditional rules. Stacked filters of the profile are merged
/// with the kernel's rule for equal-precedence errno answers (the filter
/// installed last wins), which is the only stacking kiln's profile uses.
// Values in the profile were range-checked by seccompiler above (errno
// numbers, argument indexes, 32-bit compare values), so narrowing is exact.
#[allow(clippy::cast_possible_truncation)]
mod bpf {
    use serde_json::Value;

    pub type Insn = (u16, u8, u8, u32);

    const LD_W_ABS: u16 = 0x20;
    const JMP_JA: u16 = 0x05;
    const JEQ_K: u16 = 0x15;
    const JGT_K: u16 = 0x25;
    const JGE_K: u16 = 0x35;
    const ALU_AND_K: u16 = 0x54;
    const RET_K: u16 = 0x06;
    const ALLOW: u32 = 0x7fff_0000;
    const KILL_PROCESS: u32 = 0x8000_0000;
    const ERRNO: u32 = 0x0005_0000;

    /// What one syscall number answers.
    #[derive(Clone, PartialEq, Debug)]
    enum Answer {
        Allow,
        Errno(u32),
        /// OR of rules, each an AND of (index, is_qword, op, val)
        Cond(Vec<Vec<(u32, bool, String, u64)>>),
    }

    fn action(v: &Value) -> Answer {
        match v {
            Value::String(s) if s == "allow" => Answer::Allow,
            Value::Object(o) if o.contains_key("errno") => {
                Answer::Errno(o["errno"].as_u64().expect("errno number") as u32)
            }
            other => {
                panic!("kiln's seccomp compiler supports only allow and errno actions, not {other}")
            }
        }
    }

    /// The syscall number seccompiler assigns to `name` on `target`.
    fn number(name: &str, target: seccompiler::TargetArch) -> u32 {
        let one = format!(
            r#"{{"f":{{"mismatch_action":"allow","match_action":"log","filter":[{{"syscall":"{name}"}}]}}}}"#
        );
        let map =
            seccompiler::compile_from_json(one.as_bytes(), target).expect("single rule compiles");
        let prog = &map["f"];
        // after `ld [0]` (the syscall number) the first jeq holds it
        let at = prog
            .iter()
            .position(|i| i.code == LD_W_ABS && i.k == 0)
            .expect("ld nr");
        prog[at..]
            .iter()
            .find(|i| i.code == JEQ_K)
            .expect("jeq nr")
            .k
    }

    fn audit_arch(arch: &str) -> u32 {
        match arch {
            "x86_64" => 0xC000_003E,
            "aarch64" => 0xC000_00B7,
            other => panic!("no AUDIT_ARCH for {other}"),
        }
    }

    pub fn compile(profile: &Value, target: seccompiler::TargetArch, arch: &str) -> Vec<Insn> {
        // Filters in install order: `main` first, then the others by name.
        let filters = profile.as_object().expect("profile is an object");
        let mut names: Vec<&String> = filters.keys().filter(|n| *n != "main").collect();
        names.sort();
        let main = &filters["main"];
        let default = match action(&main["mismatch_action"]) {
            Answer::Errno(e) => e,
            _ => panic!("the main filter must deny what it does not name (mismatch_action errno)"),
        };
        assert_eq!(
            action(&main["match_action"]),
            Answer::Allow,
            "the main filter must allow what it names"
        );
        let mut answers: std::collections::BTreeMap<u32, Answer> = Default::default();
        for rule in main["filter"].as_array().expect("filter list") {
            let nr = number(rule["syscall"].as_str().expect("syscall name"), target);
            let conds: Vec<(u32, bool, String, u64)> = rule["args"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|c| {
                            let op = match &c["op"] {
                                Value::String(s) => s.clone(),
                                Value::Object(o) => {
                                    format!("masked_eq:{}", o["masked_eq"].as_u64().expect("mask"))
                                }
                                other => panic!("unknown op {other}"),
                            };
                            (
                                c["index"].as_u64().expect("index") as u32,
                                c["type"].as_str() == Some("qword"),
                                op,
                                c["val"].as_u64().expect("val"),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            let entry = answers
                .entry(nr)
                .or_insert_with(|| Answer::Cond(Vec::new()));
            match (entry, conds.is_empty()) {
                (e, true) => *e = Answer::Allow,
                (Answer::Cond(rules), false) => rules.push(conds),
                (Answer::Allow, false) => {}
                _ => unreachable!(),
            }
        }
        for name in names {
            let f = &filters[name];
            assert_eq!(
                action(&f["mismatch_action"]),
                Answer::Allow,
                "filter {name}: only override filters (mismatch allow) can be stacked"
            );
            let Answer::Errno(e) = action(&f["match_action"]) else {
                panic!("filter {name}: match_action must be errno")
            };
            for rule in f["filter"].as_array().expect("filter list") {
                assert!(
                    rule.get("args").is_none(),
                    "filter {name}: override rules cannot have arguments"
                );
                let nr = number(rule["syscall"].as_str().expect("syscall name"), target);
                answers.insert(nr, Answer::Errno(e));
            }
        }
        emit(&answers, default, arch)
    }

    enum Op {
        Insn(Insn),
        /// unconditional jump to a label
        Ja(usize),
        Label(usize),
    }

    fn emit(
        answers: &std::collections::BTreeMap<u32, Answer>,
        default: u32,
        arch: &str,
    ) -> Vec<Insn> {
        // Intervals [start, next start) of the number line with one answer.
        let mut starts: Vec<(u32, Answer)> = vec![(0, Answer::Errno(default))];
        let mut prev = Answer::Errno(default);
        let mut next_nr = 0u32;
        for (nr, a) in answers {
            if *nr != next_nr && prev != Answer::Errno(default) {
                starts.push((next_nr, Answer::Errno(default)));
                prev = Answer::Errno(default);
            }
            if *a != prev || matches!(a, Answer::Cond(_)) {
                if starts.last().map(|s| s.0) == Some(*nr) {
                    starts.pop();
                }
                starts.push((*nr, a.clone()));
                prev = a.clone();
            }
            next_nr = nr + 1;
        }
        if prev != Answer::Errno(default) {
            starts.push((next_nr, Answer::Errno(default)));
        }
        // Handlers: one label per distinct answer (conditions per interval).
        let mut labels = 0usize;
        let mut new_label = || {
            labels += 1;
            labels
        };
        let mut handlers: Vec<(usize, Answer)> = Vec::new();
        let mut interval_label = Vec::new();
        for (_, a) in &starts {
            let reuse = if matches!(a, Answer::Cond(_)) {
                None
            } else {
                handlers.iter().find(|(_, h)| h == a).map(|(l, _)| *l)
            };
            let l = reuse.unwrap_or_else(|| {
                let l = new_label();
                handlers.push((l, a.clone()));
                l
            });
            interval_label.push(l);
        }
        let mut ops = vec![
            Op::Insn((LD_W_ABS, 0, 0, 4)),
            Op::Insn((JEQ_K, 1, 0, audit_arch(arch))),
            Op::Insn((RET_K, 0, 0, KILL_PROCESS)),
            Op::Insn((LD_W_ABS, 0, 0, 0)),
        ];
        let deny = new_label();
        if arch == "x86_64" {
            // x32 numbers have bit 30 set; none is allowed.
            ops.push(Op::Insn((JGE_K, 0, 1, 0x4000_0000)));
            ops.push(Op::Ja(deny));
        }
        tree(
            &starts,
            &interval_label,
            0,
            starts.len(),
            &mut ops,
            &mut new_label,
        );
        for (l, a) in &handlers {
            ops.push(Op::Label(*l));
            match a {
                Answer::Allow => ops.push(Op::Insn((RET_K, 0, 0, ALLOW))),
                Answer::Errno(e) => ops.push(Op::Insn((RET_K, 0, 0, ERRNO | e))),
                Answer::Cond(rules) => {
                    for rule in rules {
                        let next = new_label();
                        for (index, qword, op, val) in rule {
                            cond(&mut ops, *index, *qword, op, *val, next);
                        }
                        ops.push(Op::Insn((RET_K, 0, 0, ALLOW)));
                        ops.push(Op::Label(next));
                    }
                    ops.push(Op::Insn((RET_K, 0, 0, ERRNO | default)));
                }
            }
        }
        ops.push(Op::Label(deny));
        ops.push(Op::Insn((RET_K, 0, 0, ERRNO | default)));
        resolve(ops)
    }

    /// Binary search over interval starts `[lo, hi)`: leaves jump to their
    /// interval's handler.
    fn tree(
        starts: &[(u32, Answer)],
        labels: &[usize],
        lo: usize,
        hi: usize,
        ops: &mut Vec<Op>,
        new_label: &mut impl FnMut() -> usize,
    ) {
        if hi - lo == 1 {
            ops.push(Op::Ja(labels[lo]));
            return;
        }
        let mid = (lo + hi) / 2;
        let right = new_label();
        // nr >= start of `mid` goes right
        ops.push(Op::Insn((JGE_K, 0, 1, starts[mid].0)));
        ops.push(Op::Ja(right));
        tree(starts, labels, lo, mid, ops, new_label);
        ops.push(Op::Label(right));
        tree(starts, labels, mid, hi, ops, new_label);
    }

    /// One argument condition: falls through when it holds, jumps to
    /// `fail` otherwise. Arguments are little-endian u64 at 16 + 8*index.
    fn cond(ops: &mut Vec<Op>, index: u32, qword: bool, op: &str, val: u64, fail: usize) {
        let lo_off = 16 + 8 * index;
        let (mask, op) = match op.strip_prefix("masked_eq:") {
            Some(m) => (Some(m.parse::<u64>().expect("mask")), "eq"),
            None => (None, op),
        };
        if qword {
            // Only conditions decided by the low word are supported; the
            // high word must then be zero (or masked away).
            let hi_mask = mask.map_or(u64::MAX, |m| m >> 32) as u32;
            assert!(
                val >> 32 == 0 && (op == "eq"),
                "qword conditions must be eq or masked_eq with 32-bit values"
            );
            if hi_mask != 0 {
                ops.push(Op::Insn((LD_W_ABS, 0, 0, lo_off + 4)));
                ops.push(Op::Insn((ALU_AND_K, 0, 0, hi_mask)));
                ops.push(Op::Insn((JEQ_K, 1, 0, 0)));
                ops.push(Op::Ja(fail));
            }
        }
        ops.push(Op::Insn((LD_W_ABS, 0, 0, lo_off)));
        if let Some(m) = mask {
            ops.push(Op::Insn((ALU_AND_K, 0, 0, m as u32)));
        }
        let v = val as u32;
        // (code, jump over the fail jump when true?)
        let (code, pass_on_true) = match op {
            "eq" => (JEQ_K, true),
            "ne" => (JEQ_K, false),
            "gt" => (JGT_K, true),
            "ge" => (JGE_K, true),
            "lt" => (JGE_K, false),
            "le" => (JGT_K, false),
            other => panic!("unknown condition op {other}"),
        };
        if pass_on_true {
            ops.push(Op::Insn((code, 1, 0, v)));
        } else {
            ops.push(Op::Insn((code, 0, 1, v)));
        }
        ops.push(Op::Ja(fail));
    }

    fn resolve(ops: Vec<Op>) -> Vec<Insn> {
        let mut at = std::collections::HashMap::new();
        let mut pc = 0u32;
        for op in &ops {
            match op {
                Op::Label(l) => {
                    at.insert(*l, pc);
                }
                _ => pc += 1,
            }
        }
        let mut out = Vec::new();
        for op in ops {
            match op {
                Op::Insn(i) => out.push(i),
                Op::Ja(l) => {
                    let target = at[&l];
                    let here = out.len() as u32;
                    out.push((JMP_JA, 0, 0, target - here - 1));
                }
                Op::Label(_) => {}
            }
        }
        assert!(out.len() <= 4096, "seccomp program too long: {}", out.len());
        out
    }
}

fn compile_init(manifest: &std::path::Path, out: &std::path::Path) {
    let src = manifest.join("init/init.c");
    println!("cargo:rerun-if-changed={}", src.display());
    let cc = env::var("CC").unwrap_or_else(|_| "cc".into());
    let bin = out.join("kiln-init");
    let status = Command::new(&cc)
        .args([
            "-static",
            "-nostdlib",
            "-ffreestanding",
            "-fno-stack-protector",
            "-fno-asynchronous-unwind-tables",
            "-fno-pie",
            "-no-pie",
            "-Os",
            "-s",
            "-Wl,--build-id=none",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-o",
        ])
        .arg(&bin)
        .arg(&src)
        .status()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run the C compiler {cc:?} for {}: {e}",
                src.display()
            )
        });
    assert!(
        status.success(),
        "compiling {} failed (a static libc, libc6-dev, is needed)",
        src.display()
    );
}
