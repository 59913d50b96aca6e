//! The configuration file: TOML whose keys are the long flag names (`port = [8080]`,
//! `otlp-endpoint = "http://collector:4318/v1/traces"`, `capture-header = ["x-tenant"]`).
//!
//! Precedence, highest first: command-line flags, environment variables (`KSPAN_*` and the
//! standard `OTEL_EXPORTER_OTLP_*`), the file, built-in defaults. The file's values become
//! arguments for exactly the settings the command line and environment left unset, and the
//! whole is parsed again, so a value means the same in the file as on the command line.
use std::{ffi::OsString, path::PathBuf};

use clap::{CommandFactory as _, FromArgMatches as _, parser::ValueSource};

use super::{Args, OTEL_VARIABLES};

#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("{0}")]
    Cli(#[from] clap::Error),
    #[error("reading the configuration file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the configuration file {path} is not valid TOML: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error(
        "the configuration file {path} has an unknown key {key:?} (keys are the long flag names, e.g. \"port\")"
    )]
    UnknownKey { path: PathBuf, key: String },
    #[error("the configuration file {path} has a bad value for {key:?}: {message}")]
    Value {
        path: PathBuf,
        key: String,
        message: String,
    },
}

/// Parses the command line, the environment and `--config` (or `KSPAN_CONFIG`).
pub fn load(
    argv: impl IntoIterator<Item = impl Into<OsString>>,
    env: impl Fn(&str) -> Option<String>,
) -> Result<Args, FileError> {
    let mut argv: Vec<OsString> = argv.into_iter().map(Into::into).collect();
    let matches = Args::command().try_get_matches_from(&argv)?;
    let Some(path) = matches.get_one::<PathBuf>("config").cloned() else {
        return Ok(Args::from_arg_matches(&matches)?);
    };
    let text = std::fs::read_to_string(&path).map_err(|source| FileError::Read {
        path: path.clone(),
        source,
    })?;
    let table: toml::Table = toml::from_str(&text).map_err(|e| FileError::Syntax {
        path: path.clone(),
        message: e.message().to_string(),
    })?;
    let cmd = Args::command();
    for (key, value) in &table {
        let arg = cmd
            .get_arguments()
            .find(|a| a.get_long() == Some(key.as_str()) && key != "config")
            .ok_or_else(|| FileError::UnknownKey {
                path: path.clone(),
                key: key.clone(),
            })?;
        let set_elsewhere = matches!(
            matches.value_source(arg.get_id().as_str()),
            Some(ValueSource::CommandLine | ValueSource::EnvVariable)
        ) || OTEL_VARIABLES.iter().any(|(k, vars)| {
            k == key
                && vars
                    .iter()
                    .any(|v| env(v).is_some_and(|v| !v.trim().is_empty()))
        });
        if set_elsewhere {
            continue;
        }
        let bad = |message: &str| FileError::Value {
            path: path.clone(),
            key: key.clone(),
            message: message.to_string(),
        };
        let values = match value {
            toml::Value::Array(items) => items.iter().collect(),
            one => vec![one],
        };
        for v in values {
            match v {
                // A setting that takes a value (`ui = false`) gets it.
                toml::Value::Boolean(b) if arg.get_action().takes_values() => {
                    argv.push(format!("--{key}={b}").into())
                }
                toml::Value::Boolean(true) => argv.push(format!("--{key}").into()),
                // A flag that is off by default stays off.
                toml::Value::Boolean(false) => {}
                toml::Value::String(s) => argv.push(format!("--{key}={s}").into()),
                toml::Value::Integer(i) => argv.push(format!("--{key}={i}").into()),
                toml::Value::Float(f) => argv.push(format!("--{key}={f}").into()),
                _ => return Err(bad("expected a string, number, boolean or a list of them")),
            }
        }
    }
    let matches = Args::command()
        .try_get_matches_from(&argv)
        .map_err(|e| FileError::Value {
            path: path.clone(),
            key: String::new(),
            message: e.to_string().trim().to_string(),
        })?;
    Ok(Args::from_arg_matches(&matches)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_file(contents: &str, extra: &[&str]) -> Result<Args, FileError> {
        let dir = std::env::temp_dir().join(format!(
            "kspan-config-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("kspan.toml");
        std::fs::write(&path, contents).unwrap();
        let mut argv = vec![
            "kspan".to_string(),
            "--config".into(),
            path.display().to_string(),
        ];
        argv.extend(extra.iter().map(|s| s.to_string()));
        let out = load(argv, |k| {
            (k == "OTEL_EXPORTER_OTLP_ENDPOINT").then(|| "http://from-env:4318".to_string())
        });
        std::fs::remove_dir_all(&dir).unwrap();
        out
    }

    #[test]
    fn file_fills_what_flags_leave_unset() {
        let a = with_file(
            r#"
port = [8080, 9090]
linger-ms = 50
payload-cap = 2048
stdout = true
keep-query-values = false
ui = false
ui-max-mb = 4
capture-header = ["x-tenant"]
otlp-protocol = "grpc"
otlp-endpoint = "http://from-file:4317"
"#,
            &["--linger-ms", "70"],
        )
        .unwrap();
        assert_eq!(a.port, [8080, 9090]);
        assert_eq!(a.linger_ms, 70, "the flag wins");
        assert_eq!(a.payload_cap, 2048);
        assert!(a.stdout);
        assert!(!a.keep_query_values);
        assert!(!a.ui, "a setting on by default is turned off");
        assert_eq!(a.ui_max_mb, 4);
        assert_eq!(a.capture_header, ["x-tenant"]);
        assert_eq!(a.otlp_protocol.as_deref(), Some("grpc"));
        assert_eq!(
            a.otlp_endpoint, None,
            "OTEL_EXPORTER_OTLP_ENDPOINT is set, and the environment beats the file"
        );
        assert_eq!(a.ring_buffer_mb, 16, "defaults stay");
    }

    /// Every setting a standard variable also gives: the variable beats the file.
    #[test]
    fn standard_variables_beat_the_file() {
        let dir = std::env::temp_dir().join(format!("kspan-config-otel-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("kspan.toml");
        std::fs::write(
            &path,
            "otlp-certificate = \"/file/ca.pem\"\ntraces-sampler = \"always_off\"\ntraces-sampler-arg = \"0.5\"\notlp-protocol = \"grpc\"\n",
        )
        .unwrap();
        let vars = |k: &str| {
            matches!(
                k,
                "OTEL_EXPORTER_OTLP_CERTIFICATE"
                    | "OTEL_TRACES_SAMPLER"
                    | "OTEL_TRACES_SAMPLER_ARG"
            )
            .then(|| "set".to_string())
        };
        let a = load(["kspan", "--config", path.to_str().unwrap()], vars).unwrap();
        assert_eq!(a.otlp_certificate, None);
        assert_eq!(a.traces_sampler, None);
        assert_eq!(a.traces_sampler_arg, None);
        assert_eq!(
            a.otlp_protocol.as_deref(),
            Some("grpc"),
            "no variable: the file"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bad_files_are_clear_errors() {
        let err = with_file("nonsense = 1\n", &[]).unwrap_err().to_string();
        assert!(err.contains("unknown key \"nonsense\""), "{err}");
        let err = with_file("port = [\"http\"]\n", &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("bad value") && err.contains("--port"), "{err}");
        let err = with_file("port = [\n", &[]).unwrap_err().to_string();
        assert!(err.contains("not valid TOML"), "{err}");
        let err = with_file("[section]\nport = 1\n", &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown key \"section\""), "{err}");
        let err = with_file("linger-ms = { a = 1 }\n", &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("expected a string"), "{err}");
        let missing = load(["kspan", "--config", "/nonexistent/kspan.toml"], |_| None)
            .unwrap_err()
            .to_string();
        assert!(
            missing.contains("reading the configuration file"),
            "{missing}"
        );
    }
}
