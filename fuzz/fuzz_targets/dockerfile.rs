//! `cargo fuzz run dockerfile`: the Dockerfile parser, planner and
//! word lexer must never panic, whatever the bytes.

#![no_main]

use kiln_builder::frontend::shell::{Lexer, NoEnv};
use kiln_builder::frontend::{parse, plan, PlanOptions};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(ast) = parse(data, "Dockerfile") {
        let _ = ast.dump();
        let _ = plan(&ast, &PlanOptions::default());
    }
    let _ = Lexer::new('\\').process_words(&String::from_utf8_lossy(data), &NoEnv);
});
