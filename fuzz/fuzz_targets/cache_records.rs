//! An imported build cache is untrusted: its records (from a cache
//! config, or inline in an image config) are parsed and each record's
//! layers checked before anything is fetched (`remote_cache::cache_config_from`,
//! `remote_cache::checked_layers`). They must fail cleanly, never panic.
//!
//! Byte 0, bit 0: clear = a cache config blob, set = an image config with
//! inline records; the rest is the config.

#![no_main]

use kiln_builder::engine::remote_cache::{cache_config_from, checked_layers, CONFIG_MEDIA_TYPE};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&m, config)) = data.split_first() else {
        return;
    };
    let media = if m & 1 == 0 {
        CONFIG_MEDIA_TYPE
    } else {
        "application/vnd.oci.image.config.v1+json"
    };
    if let Ok(c) = cache_config_from("fuzz", media, config) {
        for r in &c.records {
            let _ = checked_layers("fuzz", &r.key, &r.state);
        }
    }
});
