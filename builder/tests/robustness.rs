//! The parser, lexer and planner never panic and stay linear on hostile
//! input. A deterministic random generator (seed from `KILN_FUZZ_SEED`,
//! rounds from `KILN_FUZZ_ROUNDS`) builds Dockerfile-shaped noise and
//! mutates real Dockerfiles; pathological shapes are timed at two sizes.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Duration;

use kiln_builder::frontend::dockerignore::Matcher;
use kiln_builder::frontend::shell::{Lexer, NoEnv};
use kiln_builder::frontend::{parse, plan, PlanOptions};

/// CPU time used by this thread: unlike wall time it does not grow when
/// other builds share the machine, so the timing assertions stay honest.
fn cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec owned by this frame for the
    // whole call; CLOCK_THREAD_CPUTIME_ID exists on every Linux kiln runs on.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID) failed");
    Duration::new(
        u64::try_from(ts.tv_sec).unwrap_or(0),
        u32::try_from(ts.tv_nsec).unwrap_or(0),
    )
}

/// xorshift64*: small, deterministic, good enough to explore inputs.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        usize::try_from(self.next() % n as u64).expect("below n, which is a usize")
    }
    fn pick<'a>(&mut self, xs: &[&'a str]) -> &'a str {
        xs[self.below(xs.len())]
    }
}

const TOKENS: &[&str] = &[
    "FROM ",
    "RUN ",
    "COPY ",
    "ADD ",
    "ENV ",
    "ARG ",
    "LABEL ",
    "CMD ",
    "ENTRYPOINT ",
    "SHELL ",
    "EXPOSE ",
    "WORKDIR ",
    "USER ",
    "VOLUME ",
    "ONBUILD ",
    "HEALTHCHECK ",
    "STOPSIGNAL ",
    "MAINTAINER ",
    "AS ",
    "scratch",
    "alpine",
    "a",
    "b",
    "--from=",
    "--mount=",
    "type=cache,",
    "target=/x",
    "--chmod=",
    "--link",
    "--",
    "-",
    "=",
    " ",
    "  ",
    "\t",
    "\n",
    "\n",
    "\n",
    "\r\n",
    "\\",
    "\\\n",
    "`",
    "# escape=`\n",
    "# syntax=x\n",
    "#",
    "\"",
    "'",
    "$",
    "${",
    "}",
    "{",
    ":-",
    ":+",
    ":?",
    "#",
    "%%",
    "/",
    "//",
    "[",
    "]",
    "[\"a\", \"b\"]",
    ",",
    "<<",
    "<<-",
    "EOF",
    "<<EOF\n",
    "\nEOF\n",
    "FROM a AS a\n",
    "FROM a AS b\n",
    "FROM b\n",
    "--from=a ",
    "--from=0 ",
    "--mount=from=b,target=/x ",
    "ONBUILD COPY --from=a / /\n",
    "ONBUILD ARG X=${X:?x}\n",
    "WORKDIR rel\n",
    "--platform=linux/arm64 ",
    "--device=x,required ",
    "type=secret,source=s ",
    "STOPSIGNAL 0\n",
    "0",
    "1",
    "9999",
    "é",
    "☃",
    "\u{0}",
    "\u{feff}",
    "NONE",
    "CMD",
    "x=y",
    "$A",
    "${A:-b}",
];

fn noise(rng: &mut Rng) -> Vec<u8> {
    let n = rng.below(60);
    let mut s = String::new();
    for _ in 0..n {
        s.push_str(rng.pick(TOKENS));
    }
    let mut bytes = s.into_bytes();
    if rng.below(8) == 0 && !bytes.is_empty() {
        let i = rng.below(bytes.len());
        bytes[i] = (rng.next() & 0xff) as u8;
    }
    bytes
}

fn mutate(rng: &mut Rng, seed: &[u8]) -> Vec<u8> {
    let mut b = seed.to_vec();
    for _ in 0..=rng.below(6) {
        if b.is_empty() {
            break;
        }
        let i = rng.below(b.len());
        match rng.below(5) {
            0 => b[i] = (rng.next() & 0xff) as u8,
            1 => {
                b.remove(i);
            }
            2 => {
                let t = rng.pick(TOKENS).as_bytes().to_vec();
                b.splice(i..i, t);
            }
            3 => {
                let j = (i + rng.below(40)).min(b.len());
                let chunk = b[i..j].to_vec();
                b.splice(j..j, chunk);
            }
            _ => b.truncate(i),
        }
    }
    b
}

fn exercise(input: &[u8]) {
    if let Ok(ast) = parse(input, "Dockerfile") {
        let _ = ast.dump();
        for target in [None, Some("a".to_string())] {
            let _ = plan(
                &ast,
                &PlanOptions {
                    target,
                    ..PlanOptions::default()
                },
            )
            .map(|p| serde_json::to_string(&p));
        }
    }
    let text = String::from_utf8_lossy(input);
    let lex = Lexer::new('\\');
    let _ = lex.process_words(&text, &NoEnv);
    // Matching costs patterns x path depth; exercise it on noise-sized
    // inputs only, with a realistic path.
    if input.len() < 4096 {
        let _ =
            Matcher::from_dockerignore(input).map(|m| (m.matches(&text), m.matches("a/b/c.txt")));
    }
}

const SEEDS: &[&str] = &[
    include_str!("corpus/go-cross/Dockerfile"),
    include_str!("corpus/node-pnpm/Dockerfile"),
    include_str!("corpus/debian-heredocs/Dockerfile"),
    include_str!("corpus/windows-escape/Dockerfile"),
    include_str!("corpus/rust-chef/Dockerfile"),
];

#[test]
fn random_and_mutated_inputs_never_panic() {
    let seed = std::env::var("KILN_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x9e37_79b9_7f4a_7c15u64);
    let rounds = std::env::var("KILN_FUZZ_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3000usize);
    let mut rng = Rng(seed | 1);
    let start = cpu_time();
    for round in 0..rounds {
        let input = if round % 2 == 0 {
            noise(&mut rng)
        } else {
            let s = SEEDS[rng.below(SEEDS.len())];
            mutate(&mut rng, s.as_bytes())
        };
        let t = cpu_time();
        if catch_unwind(AssertUnwindSafe(|| exercise(&input))).is_err() {
            panic!(
                "panicked on round {round} (seed {seed}): {:?}",
                String::from_utf8_lossy(&input)
            );
        }
        assert!(
            cpu_time() - t < Duration::from_secs(2),
            "slow on {:?}",
            String::from_utf8_lossy(&input)
        );
    }
    eprintln!("{rounds} inputs in {:?} of CPU time", cpu_time() - start);
}

/// Time `f` on inputs of size n and 4n; quadratic growth would be ~16x.
/// The best of three runs is taken, since the machine may be busy.
fn assert_linear(name: &str, make: impl Fn(usize) -> Vec<u8>) {
    let time = |n: usize| {
        let input = make(n);
        (0..3)
            .map(|_| {
                let t = cpu_time();
                catch_unwind(AssertUnwindSafe(|| exercise(&input)))
                    .unwrap_or_else(|_| panic!("{name} panicked"));
                cpu_time() - t
            })
            .min()
            .unwrap_or_default()
    };
    let n = 4000;
    let small = time(n).max(Duration::from_millis(1));
    let big = time(4 * n);
    let ratio = big.as_secs_f64() / small.as_secs_f64();
    assert!(
        ratio < 10.0,
        "{name}: n={n} took {small:?}, 4n took {big:?} (x{ratio:.1}): not linear"
    );
    assert!(big < Duration::from_secs(20), "{name}: {big:?}");
}

#[test]
fn pathological_shapes_stay_linear() {
    assert_linear("continuations", |n| {
        format!("FROM a\nRUN x{}\n", " \\\n  y".repeat(n)).into_bytes()
    });
    assert_linear("continuation comments", |n| {
        format!("FROM a\nRUN x \\\n{}y\n", "# c\n\n".repeat(n)).into_bytes()
    });
    assert_linear("heredoc body", |n| {
        format!("FROM a\nRUN <<EOF\n{}EOF\n", "line $x\n".repeat(n)).into_bytes()
    });
    assert_linear("many heredocs", |n| {
        format!(
            "FROM a\nRUN cat {}\n{}",
            "<<E ".repeat(n),
            "x\nE\n".repeat(n)
        )
        .into_bytes()
    });
    assert_linear("unterminated heredocs", |n| {
        format!("FROM a\nRUN {}\n{}", "<<E ".repeat(n), "x\n".repeat(n)).into_bytes()
    });
    assert_linear("env chain", |n| {
        let mut s = String::from("FROM scratch\n");
        for i in 0..n {
            s.push_str(&format!("ENV V{i}=$V{}x\n", i.saturating_sub(1)));
        }
        s.into_bytes()
    });
    assert_linear("stage chain", |n| {
        let mut s = String::from("ARG G=1\nFROM scratch AS s0\n");
        for i in 1..n {
            s.push_str(&format!("FROM s{} AS s{i}\nCOPY --from=s0 / /\n", i - 1));
        }
        s.into_bytes()
    });
    assert_linear("quotes and escapes", |n| {
        format!("FROM a\nENV a=\"{}\"\n", "\\\"'$".repeat(n)).into_bytes()
    });
    assert_linear("nested expansions", |n| {
        format!(
            "FROM a\nENV a={}\n",
            "${x:-".repeat(n.min(60)) + &"y}".repeat(n.min(60)) + &"$y".repeat(n)
        )
        .into_bytes()
    });
    assert_linear("flags", |n| {
        format!("FROM a\nCOPY {}a b\n", "--exclude=x ".repeat(n)).into_bytes()
    });
    assert_linear("long word", |n| {
        format!("FROM a\nLABEL k={}\n", "v".repeat(50 * n)).into_bytes()
    });
    assert_linear("onbuild chain", |n| {
        format!("FROM a\n{}RUN x\n", "ONBUILD ".repeat(25 * n)).into_bytes()
    });
    assert_linear("comments", |n| {
        format!("{}FROM a\n", "# comment\n".repeat(n)).into_bytes()
    });
}
