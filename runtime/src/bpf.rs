//! A compact BPF compiler for kiln's profile format.
//!
//! seccompiler emits one linear chain per syscall: a syscall numbered N runs
//! through about 2N instructions, and the kernel's seccomp action cache
//! (which emulates the filter once for every syscall number when it is
//! installed) then costs milliseconds per step. This compiler emits one
//! program: the architecture check, the x32 check, a binary search over
//! ranges of syscall numbers that share an answer, and short argument checks
//! for the few conditional rules. Stacked filters of the profile are merged
//! with the kernel's rule for equal-precedence errno answers (the filter
//! installed last wins), which is the only stacking kiln's profile uses.
//!
//! It runs in `build.rs` (included there by path), after seccompiler has
//! validated the profile; the library compiles it only for its tests,
//! which check that its program answers every syscall as seccompiler's
//! filters do. It never runs in a sandbox: the runtime only installs the
//! program it produced.

// Values in the profile were range-checked by seccompiler before this runs
// (errno numbers, argument indexes, 32-bit compare values), so narrowing is
// exact.
#![allow(clippy::cast_possible_truncation)]

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
    let map = seccompiler::compile_from_json(one.as_bytes(), target).expect("single rule compiles");
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

fn emit(answers: &std::collections::BTreeMap<u32, Answer>, default: u32, arch: &str) -> Vec<Insn> {
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

/// kiln's program against seccompiler's for the default profile. The
/// instruction streams legitimately differ (seccompiler emits one filter
/// per profile entry, each a linear chain per syscall; kiln one merged
/// binary search), so the tests compare verdicts: both are interpreted, as
/// the kernel runs them, over every syscall number in range, x32 numbers,
/// foreign architectures and many argument values, and must answer the same
/// return value (action and errno) for each.
#[cfg(test)]
mod tests {
    use super::*;

    const PROFILE: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../seccomp-profiles/default.json"
    );

    /// The 64-byte `struct seccomp_data` the kernel hands a filter.
    struct Data {
        nr: u32,
        arch: u32,
        args: [u64; 6],
    }

    impl Data {
        /// The 32-bit word at byte offset `k`, as `ld [k]` reads it
        /// (native byte order, like the kernel's struct).
        fn word(&self, k: u32) -> u32 {
            let mut bytes = [0u8; 64];
            bytes[0..4].copy_from_slice(&self.nr.to_ne_bytes());
            bytes[4..8].copy_from_slice(&self.arch.to_ne_bytes());
            for (i, a) in self.args.iter().enumerate() {
                bytes[16 + 8 * i..24 + 8 * i].copy_from_slice(&a.to_ne_bytes());
            }
            let k = k as usize;
            assert!(k & 3 == 0 && k + 4 <= 64, "ld out of seccomp_data: {k}");
            u32::from_ne_bytes(bytes[k..k + 4].try_into().unwrap())
        }
    }

    /// Run a classic BPF program as seccomp does; panics on an instruction
    /// outside what either compiler emits, or on a fall off the end.
    fn run(prog: &[Insn], d: &Data) -> u32 {
        let (mut pc, mut acc) = (0usize, 0u32);
        loop {
            let (code, jt, jf, k) = prog[pc];
            pc += 1;
            let jump = |taken: bool| usize::from(if taken { jt } else { jf });
            match code {
                LD_W_ABS => acc = d.word(k),
                ALU_AND_K => acc &= k,
                RET_K => return k,
                JMP_JA => pc += k as usize,
                JEQ_K => pc += jump(acc == k),
                JGT_K => pc += jump(acc > k),
                JGE_K => pc += jump(acc >= k),
                // jset
                0x45 => pc += jump(acc & k != 0),
                other => panic!("unexpected BPF opcode {other:#x} at {}", pc - 1),
            }
        }
    }

    /// The verdict of stacked filters, in install order: the kernel runs
    /// every filter and keeps the most restrictive action (compared as a
    /// signed number, so KILL_PROCESS is lowest); between equal actions the
    /// filter installed last wins.
    fn run_stacked(filters: &[Vec<Insn>], d: &Data) -> u32 {
        let action = |r: u32| (r & 0xffff_0000) as i32;
        let mut verdict: Option<u32> = None;
        for f in filters.iter().rev() {
            let r = run(f, d);
            if verdict.is_none_or(|v| action(r) < action(v)) {
                verdict = Some(r);
            }
        }
        verdict.expect("at least one filter")
    }

    fn arch() -> (&'static str, seccompiler::TargetArch) {
        let arch = std::env::consts::ARCH;
        (arch, arch.try_into().expect("a seccompiler architecture"))
    }

    fn kiln_program() -> Vec<Insn> {
        let json: Value =
            serde_json::from_slice(&std::fs::read(PROFILE).expect("read profile")).unwrap();
        let (name, target) = arch();
        compile(&json, target, name)
    }

    /// seccompiler's filters, in the order kiln's compiler assumes they
    /// are installed: `main` first, then the others by name.
    fn seccompiler_programs() -> Vec<Vec<Insn>> {
        let map = seccompiler::compile_from_json(
            std::fs::File::open(PROFILE).expect("open profile"),
            arch().1,
        )
        .expect("the profile compiles");
        let mut names: Vec<&String> = map.keys().filter(|n| *n != "main").collect();
        names.sort();
        std::iter::once(&map["main"])
            .chain(names.into_iter().map(|n| &map[n]))
            .map(|p| p.iter().map(|i| (i.code, i.jt, i.jf, i.k)).collect())
            .collect()
    }

    /// Argument values that sit on or next to every boundary the default
    /// profile tests (clone's namespace flags, TIOCSTI, personalities,
    /// socket families), plus high words that must not change a dword
    /// compare and must fail a qword one.
    fn interesting_values() -> Vec<u64> {
        let mut v: Vec<u64> = vec![
            0,
            1,
            2,
            8,
            0x11,
            0x0002_0000,
            0x0002_0008,
            0x5412,
            0x5413,
            0x5411,
            0xffff_ffff,
            0xffff_fffe,
            0x7E02_0000,
            0x0001_0000_0000,
            u64::MAX,
            0x0000_0001_0000_5412,
            0xffff_ffff_0000_0000,
            libc::SIGCHLD as u64,
            (libc::CLONE_VM | libc::CLONE_FS | libc::CLONE_FILES | libc::CLONE_SIGHAND) as u64,
            (libc::CLONE_THREAD | libc::CLONE_SETTLS) as u64,
        ];
        for family in 35..=48 {
            v.push(family);
            v.push(family | 0x1_0000_0000);
        }
        for flag in [
            libc::CLONE_NEWNS,
            libc::CLONE_NEWCGROUP,
            libc::CLONE_NEWUTS,
            libc::CLONE_NEWIPC,
            libc::CLONE_NEWUSER,
            libc::CLONE_NEWPID,
            libc::CLONE_NEWNET,
        ] {
            let flag = u64::from(flag.cast_unsigned());
            v.push(flag);
            v.push(flag | libc::SIGCHLD as u64);
            v.push(flag << 32);
        }
        v
    }

    #[test]
    fn same_verdict_as_seccompiler_for_every_syscall_number() {
        let (name, _) = arch();
        let ours = kiln_program();
        let theirs = seccompiler_programs();
        assert!(theirs.len() >= 2, "the default profile stacks filters");
        let native = audit_arch(name);
        let values = interesting_values();
        let mut checked = 0u64;
        let mut allowed = 0u64;
        let numbers = (0..1024u32)
            .chain((0..1024).map(|n| n | 0x4000_0000))
            .chain([0x3fff_ffff, 0x7fff_ffff, 0x8000_0000, u32::MAX]);
        for nr in numbers {
            let mut inputs: Vec<[u64; 6]> = values.iter().map(|&v| [v; 6]).collect();
            // one argument at a time, the others zero
            for i in 0..6 {
                for &v in &values {
                    let mut a = [0u64; 6];
                    a[i] = v;
                    inputs.push(a);
                }
            }
            for args in inputs {
                let d = Data {
                    nr,
                    arch: native,
                    args,
                };
                let (a, b) = (run(&ours, &d), run_stacked(&theirs, &d));
                assert_eq!(
                    a, b,
                    "syscall {nr:#x} args {args:x?}: kiln answers {a:#x}, seccompiler {b:#x}"
                );
                checked += 1;
                allowed += u64::from(a == ALLOW);
            }
        }
        // the comparison covered both answers, not only denials
        assert!(
            allowed > 1000 && allowed < checked,
            "{allowed} of {checked}"
        );
    }

    #[test]
    fn same_verdict_as_seccompiler_for_pseudo_random_inputs() {
        let (name, _) = arch();
        let ours = kiln_program();
        let theirs = seccompiler_programs();
        let values = interesting_values();
        // xorshift: reproducible without a dependency
        let mut s = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        for _ in 0..200_000 {
            let r = next();
            let nr = (r % 520) as u32;
            let mut args = [0u64; 6];
            for a in &mut args {
                let r = next();
                *a = match r % 3 {
                    0 => values[(r >> 8) as usize % values.len()],
                    1 => r >> 2,
                    _ => (r >> 2) & 0xffff_ffff,
                };
            }
            let d = Data {
                nr,
                arch: audit_arch(name),
                args,
            };
            assert_eq!(
                run(&ours, &d),
                run_stacked(&theirs, &d),
                "{nr:#x} {args:x?}"
            );
        }
    }

    /// What these tests check is what the runtime installs.
    #[test]
    fn the_embedded_program_is_this_compilers() {
        let mut bytes = Vec::new();
        for (code, jt, jf, k) in kiln_program() {
            bytes.extend_from_slice(&code.to_ne_bytes());
            bytes.extend_from_slice(&[jt, jf]);
            bytes.extend_from_slice(&k.to_ne_bytes());
        }
        assert_eq!(bytes, crate::seccomp::default_profile_bytes());
    }

    #[test]
    fn a_foreign_architecture_is_killed_by_both() {
        let (name, _) = arch();
        let ours = kiln_program();
        let theirs = seccompiler_programs();
        for foreign in [0x4000_0003u32, 0xC000_0028, 0, audit_arch(name) ^ 1] {
            for nr in [0u32, 1, 59, 435] {
                let d = Data {
                    nr,
                    arch: foreign,
                    args: [0; 6],
                };
                assert_eq!(run(&ours, &d), KILL_PROCESS, "arch {foreign:#x}");
                assert_eq!(run_stacked(&theirs, &d), KILL_PROCESS, "arch {foreign:#x}");
            }
        }
    }
}
