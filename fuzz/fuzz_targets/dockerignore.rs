//! `.dockerignore` matcher: the pattern text comes from the build context
//! (untrusted), the paths from walking it. Neither may make kiln panic,
//! and a walk's answer (each directory's hits passed down, as
//! `engine::filecopy` walks) is the whole path's.
//!
//! Input: the ignore file's bytes, a NUL byte, then paths one per line.

#![no_main]

use kiln_builder::frontend::dockerignore::Matcher;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (text, paths) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &b""[..]),
    };
    let Ok(m) = Matcher::from_dockerignore(text) else {
        return;
    };
    // the cleaned patterns kiln shows (`kiln build --debug`) compile again
    let again = Matcher::new(m.patterns()).expect("cleaned patterns compile again");
    for path in String::from_utf8_lossy(paths).split('\n') {
        let hit = m.matches(path);
        assert_eq!(
            hit,
            again.matches(path),
            "cleaned patterns match {path:?} differently"
        );
        // down the path one directory at a time, by names as a directory
        // listing gives them (never empty, `.` or `..`)
        let parts: Vec<&str> = path
            .split('/')
            .filter(|p| !p.is_empty() && *p != ".")
            .collect();
        if parts.contains(&"..") {
            continue;
        }
        let mut hits = m.no_hits();
        for i in 1..=parts.len() {
            let prefix = parts[..i].join("/");
            assert_eq!(
                m.matches_in(&hits, &prefix),
                m.matches(&prefix),
                "a walk decides {prefix:?} differently"
            );
            hits = m.child_hits(&hits, &prefix);
        }
    }
});
