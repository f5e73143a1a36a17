//! Where the helper program is found (`@exe_dir/NAME`), what its environment
//! holds (`env` values, `env_allowlist`, the launch's own `SANDPOOL_*`), and
//! what a pinned image changes for the helper (`/proc/PID/exe`), read off
//! the real helper processes in `/proc`.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use sandpool::{Config, LaunchMode, Pool};
use sandpool_reference_helper::reference::{OP_ECHO, request};
use sandpool_tests::{helper_bin, pool_config};

/// The helper's initial environment, from `/proc/PID/environ`.
fn environ_of(pid: u32) -> BTreeMap<String, String> {
    let raw = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    raw.split(|b| *b == 0)
        .filter(|var| !var.is_empty())
        .map(|var| {
            let var = String::from_utf8(var.to_vec()).unwrap();
            let (name, value) = var.split_once('=').unwrap();
            (name.to_owned(), value.to_owned())
        })
        .collect()
}

fn exe_of(pid: u32) -> PathBuf {
    std::fs::read_link(format!("/proc/{pid}/exe")).unwrap()
}

/// A copy of the reference helper beside this test binary, removed on drop.
struct BesideExe(PathBuf);

impl BesideExe {
    fn new(tag: &str) -> BesideExe {
        let dir = std::env::current_exe()
            .unwrap()
            .parent()
            .unwrap()
            .to_owned();
        let path = dir.join(format!("sandpool-helper-{tag}-{}", std::process::id()));
        std::fs::copy(helper_bin(), &path).unwrap();
        BesideExe(path)
    }

    fn name(&self) -> &str {
        self.0.file_name().unwrap().to_str().unwrap()
    }
}

impl Drop for BesideExe {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
fn env_values_and_allowlisted_variables_are_all_a_helper_gets() {
    // This process has PATH (cargo runs tests with it) and more (HOME,
    // CARGO_*), which are not passed.
    assert!(std::env::var_os("PATH").is_some());
    assert!(std::env::var_os("NOT_SET_IN_THIS_HOST").is_none());
    for mode in [LaunchMode::Launcher, LaunchMode::Direct] {
        let mut config = pool_config(&[]);
        config.launch_mode = mode;
        config.spares = 0;
        // A listed variable the host does not have is simply absent.
        config.env_allowlist = vec!["PATH".into(), "NOT_SET_IN_THIS_HOST".into()];
        config.env = BTreeMap::from([
            ("LD_LIBRARY_PATH".to_owned(), "/opt/redo/lib".to_owned()),
            ("REDO_DATA".to_owned(), "/var/lib/redo data=1".to_owned()),
        ]);
        let pool = Pool::new(config).unwrap();
        assert_eq!(pool.call("t", &request(OP_ECHO, b"hi")).unwrap(), b"hi");
        let pid = pool.helper_info("t").unwrap().pid;
        let environ = environ_of(pid);
        let names: Vec<&str> = environ.keys().map(String::as_str).collect();
        assert_eq!(
            names,
            [
                "LD_LIBRARY_PATH",
                "PATH",
                "REDO_DATA",
                "SANDPOOL_PROGRAM",
                "SANDPOOL_SANDBOX"
            ],
            "{mode:?}"
        );
        assert_eq!(environ["LD_LIBRARY_PATH"], "/opt/redo/lib");
        assert_eq!(environ["REDO_DATA"], "/var/lib/redo data=1");
        assert_eq!(
            std::ffi::OsStr::new(&environ["PATH"]),
            std::env::var_os("PATH").unwrap()
        );
        assert_eq!(Path::new(&environ["SANDPOOL_PROGRAM"]), helper_bin());
    }
}

#[test]
fn exe_dir_names_the_helper_beside_the_running_executable() {
    let copy = BesideExe::new("pinned");
    let mut config = pool_config(&[]);
    config.program = format!("@exe_dir/{}", copy.name()).into();
    config.spares = 0;
    let pool = Pool::new(config).unwrap();
    // The image is pinned at Pool::new: the file is no longer needed.
    std::fs::remove_file(&copy.0).unwrap();
    assert_eq!(pool.call("t", &request(OP_ECHO, b"hi")).unwrap(), b"hi");
    let pid = pool.helper_info("t").unwrap().pid;
    assert_eq!(Path::new(&environ_of(pid)["SANDPOOL_PROGRAM"]), copy.0);
    // What pinning changes for the helper: its executable is the sealed
    // memfd, not the file; SANDPOOL_PROGRAM is how it finds its path.
    let exe = exe_of(pid);
    assert!(
        exe.to_string_lossy().starts_with("/memfd:"),
        "a pinned helper's /proc/PID/exe: {}",
        exe.display()
    );
    let argv0 = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    let argv0 = argv0.split(|b| *b == 0).next().unwrap();
    assert_eq!(Path::new(std::str::from_utf8(argv0).unwrap()), copy.0);
}

#[test]
fn an_unpinned_exe_dir_helper_runs_the_file_itself() {
    let copy = BesideExe::new("unpinned");
    for mode in [LaunchMode::Launcher, LaunchMode::Direct] {
        let mut config = pool_config(&[]);
        config.program = format!("@exe_dir/{}", copy.name()).into();
        config.pin_image = false;
        config.launch_mode = mode;
        config.spares = 0;
        let pool = Pool::new(config).unwrap();
        assert_eq!(pool.call("t", &request(OP_ECHO, b"hi")).unwrap(), b"hi");
        let pid = pool.helper_info("t").unwrap().pid;
        assert_eq!(exe_of(pid), copy.0, "{mode:?}");
        assert_eq!(Path::new(&environ_of(pid)["SANDPOOL_PROGRAM"]), copy.0);
    }
}

#[test]
fn a_missing_exe_dir_helper_fails_pool_new_naming_the_resolved_path() {
    let mut config = pool_config(&[]);
    config.program = "@exe_dir/no-such-sandpool-helper".into();
    let err = Pool::new(config).unwrap_err().to_string();
    let beside = std::env::current_exe()
        .unwrap()
        .parent()
        .unwrap()
        .join("no-such-sandpool-helper");
    assert!(
        err.contains(&beside.display().to_string()),
        "the error names {}: {err}",
        beside.display()
    );
}

/// A change to a valid configuration.
type Change = Box<dyn Fn(&mut Config)>;

#[test]
fn bad_program_and_env_values_are_refused_by_name() {
    let cases: [(&str, Change, &str); 9] = [
        (
            "program",
            Box::new(|c| c.program = "@exe_dir".into()),
            "must be followed by /NAME",
        ),
        (
            "program",
            Box::new(|c| c.program = "@exe_dir/".into()),
            "must be followed by /NAME",
        ),
        (
            "program",
            Box::new(|c| c.program = "@exedir/sandpool-helper".into()),
            "the only placeholder is @exe_dir/",
        ),
        (
            "env",
            Box::new(|c| {
                c.env.insert("A=B".into(), "x".into());
            }),
            "is not a variable name",
        ),
        (
            "env",
            Box::new(|c| {
                c.env.insert(String::new(), "x".into());
            }),
            "is not a variable name",
        ),
        (
            "env",
            Box::new(|c| {
                c.env
                    .insert("SANDPOOL_SANDBOX".into(), "seccomp=off".into());
            }),
            "reserves",
        ),
        (
            "env",
            Box::new(|c| {
                c.env.insert("DATA".into(), "a\0b".into());
            }),
            "NUL",
        ),
        (
            "env",
            Box::new(|c| {
                c.env.insert("PATH".into(), "/bin".into());
                c.env_allowlist.push("PATH".into());
            }),
            "also in env_allowlist",
        ),
        (
            "env_allowlist",
            Box::new(|c| c.env_allowlist.push("SANDPOOL_PROGRAM".into())),
            "the launch's own",
        ),
    ];
    for (field, change, says) in cases {
        let mut config = pool_config(&[]);
        change(&mut config);
        let err = config.validate().unwrap_err();
        assert_eq!(err.field, field, "{err}");
        assert!(err.to_string().contains(says), "{err}");
        assert!(Pool::new(config).is_err());
    }
    // A file whose name starts with @ is written as a relative path.
    let mut config = pool_config(&[]);
    config.program = "./@exedir/helper".into();
    config.validate().unwrap();
}

#[test]
fn env_is_a_toml_table_and_cannot_change_live() {
    let text = r#"
        program = "@exe_dir/sandpool-helper"
        env_allowlist = ["TZ"]
        [env]
        LD_LIBRARY_PATH = "/opt/redo/lib"
        PGDATA = "/var/lib/redo"
    "#;
    let config = Config::from_toml(text).unwrap();
    assert_eq!(config.program, Path::new("@exe_dir/sandpool-helper"));
    assert_eq!(config.env["PGDATA"], "/var/lib/redo");
    assert_eq!(config.env.len(), 2);
    let mut changed = config.clone();
    changed.env.insert("PGDATA".into(), "/elsewhere".into());
    assert_eq!(config.first_fixed_change(&changed), Some("env"));
    let err = Config::from_toml("program = \"x\"\n[env]\nSANDPOOL_X = \"1\"\n").unwrap_err();
    assert_eq!(err.field, "env", "{err}");
}

/// `path` relative to this process's working directory (`..` as needed).
fn relative_to_cwd(path: &Path) -> PathBuf {
    let cwd = std::env::current_dir().unwrap();
    let common = cwd
        .components()
        .zip(path.components())
        .take_while(|(a, b)| a == b)
        .count();
    let mut relative = PathBuf::new();
    for _ in cwd.components().skip(common) {
        relative.push("..");
    }
    for part in path.components().skip(common) {
        relative.push(part);
    }
    relative
}

#[test]
fn a_relative_program_is_made_absolute_once_for_every_launch_mode() {
    let relative = relative_to_cwd(&helper_bin());
    assert!(relative.is_relative(), "{}", relative.display());
    let absolute = std::env::current_dir().unwrap().join(&relative);
    for mode in [LaunchMode::Launcher, LaunchMode::Direct] {
        let mut config = pool_config(&[]);
        config.program = relative.clone();
        config.pin_image = false;
        config.launch_mode = mode;
        config.spares = 0;
        let pool = Pool::new(config).unwrap();
        assert_eq!(pool.call("t", &request(OP_ECHO, b"hi")).unwrap(), b"hi");
        let pid = pool.helper_info("t").unwrap().pid;
        // What it runs, what it is told, and its argv[0] agree: the
        // absolute path, not one relative to wherever the host is now.
        assert_eq!(
            exe_of(pid),
            std::fs::canonicalize(helper_bin()).unwrap(),
            "{mode:?}"
        );
        assert_eq!(Path::new(&environ_of(pid)["SANDPOOL_PROGRAM"]), absolute);
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
        let argv0 = cmdline.split(|b| *b == 0).next().unwrap();
        assert_eq!(Path::new(std::str::from_utf8(argv0).unwrap()), absolute);
    }
}
