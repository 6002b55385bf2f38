//! `fenx-sync demo` is what a newcomer runs first: it must settle everything. How fast is the
//! demo's own concern: it gives up (and fails) when its waits for the outbox to settle time out.

use std::process::Command;

#[test]
fn the_demo_syncs_everything_and_prints_the_cookbook_queries() {
    let out = Command::new(env!("CARGO_BIN_EXE_fenx-sync"))
        .arg("demo")
        .env_remove("FENX_CONFIG")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("outbox: 29 done, 4 ignored, 0 dead; 5 duplicate deliveries recognised"),
        "{stdout}"
    );
    assert!(stdout.contains("(the newer version won)"), "{stdout}");
    assert!(stdout.contains("-- entities by country of incorporation"));
    assert!(stdout.contains("entitydata:draftverified"), "{stdout}");
}
