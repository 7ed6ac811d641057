//! The image config: what config-only instructions change, and history.

use super::*;

pub(super) fn set_config(built: &mut Built, key: &str, value: Value) {
    built.config["config"][key] = value;
}

pub(super) fn apply_config(built: &mut Built, change: &ConfigChange) {
    let section = &mut built.config["config"];
    match change {
        ConfigChange::Env(pairs) => {
            let mut env = crate::resolver::strings(&section["Env"]);
            for (key, value) in pairs {
                env.retain(|item| {
                    item.split_once('=').map_or(item.as_str(), |(name, _)| name) != key
                });
                env.push(format!("{key}={value}"));
            }
            section["Env"] = json!(env);
        }
        ConfigChange::Label(pairs) => {
            if !section["Labels"].is_object() {
                section["Labels"] = json!({});
            }
            for (key, value) in pairs {
                section["Labels"][key] = json!(value);
            }
        }
        ConfigChange::Arg(_) => {}
        ConfigChange::User(user) => section["User"] = json!(user),
        ConfigChange::Expose(ports) => {
            if !section["ExposedPorts"].is_object() {
                section["ExposedPorts"] = json!({});
            }
            for port in ports {
                section["ExposedPorts"][port] = json!({});
            }
        }
        ConfigChange::Volume(paths) => {
            if !section["Volumes"].is_object() {
                section["Volumes"] = json!({});
            }
            for path in paths {
                section["Volumes"][path] = json!({});
            }
        }
        ConfigChange::Cmd(command) => {
            section["Cmd"] = json!(command);
            built.cmd_set = true;
        }
        ConfigChange::Entrypoint(entrypoint) => {
            section["Entrypoint"] = json!(entrypoint);
            if !built.cmd_set {
                section["Cmd"] = Value::Null;
                if let Some(section) = section.as_object_mut() {
                    section.remove("Cmd");
                }
            }
        }
        ConfigChange::Shell(shell) => section["Shell"] = json!(shell),
        ConfigChange::StopSignal(signal) => section["StopSignal"] = json!(signal),
        ConfigChange::Healthcheck(check) => {
            let nanos = |duration: &Option<std::time::Duration>| {
                duration.map(|duration| duration.as_nanos() as u64)
            };
            let mut value = json!({"Test": check.test});
            for (key, duration) in [
                ("Interval", nanos(&check.interval)),
                ("Timeout", nanos(&check.timeout)),
                ("StartPeriod", nanos(&check.start_period)),
                ("StartInterval", nanos(&check.start_interval)),
            ] {
                if let Some(duration) = duration {
                    value[key] = json!(duration);
                }
            }
            if let Some(retries) = check.retries {
                value["Retries"] = json!(retries);
            }
            section["Healthcheck"] = value;
        }
        ConfigChange::Onbuild(trigger) => {
            if !section["OnBuild"].is_array() {
                section["OnBuild"] = json!([]);
            }
            if let Some(items) = section["OnBuild"].as_array_mut() {
                items.push(json!(trigger));
            }
        }
        ConfigChange::Maintainer(author) => built.config["author"] = json!(author),
    }
}

/// The history entry's `created_by`, as BuildKit's Dockerfile frontend writes it: steps that
/// make a layer end in ` # buildkit`; lists print as Go's `%q` of a slice, maps as `%v`.
pub(super) fn history_text(step: &Step) -> String {
    use rbuild_frontend::parser::go_quote;
    let quoted = |words: &[String]| {
        let words: Vec<String> = words.iter().map(|word| go_quote(word)).collect();
        format!("[{}]", words.join(" "))
    };
    let pairs = |pairs: &[(String, String)]| {
        pairs
            .iter()
            .map(|(key, value)| format!("{key}={value}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let instruction = step.instruction.lines().next().unwrap_or_default();
    match &step.op {
        Op::Run(run) => {
            // BuildKit's prefix: `|N NAME=value ...` for the stage's build args.
            let mut words: Vec<String> = run
                .build_args
                .iter()
                .filter_map(|name| {
                    let value = run.env.iter().rev().find(|(key, _)| key == name)?;
                    Some(format!("{name}={}", value.1))
                })
                .collect();
            if !words.is_empty() {
                words.insert(0, format!("|{}", words.len()));
            }
            words.extend(run.arguments.iter().cloned());
            format!("RUN {} # buildkit", words.join(" "))
        }
        Op::Copy(copy) => {
            let kind = if copy.is_add { "ADD" } else { "COPY" };
            let mut sources = copy.sources.clone();
            sources.extend(copy.inline_sources.iter().map(|(name, _)| name.clone()));
            format!(
                "{kind} {} {} # buildkit",
                sources.join(" "),
                copy.destination
            )
        }
        Op::Workdir { path } => format!("WORKDIR {path}"),
        Op::Config(change) => match change {
            ConfigChange::Env(values) => format!("ENV {}", pairs(values)),
            ConfigChange::Label(values) => format!("LABEL {}", pairs(values)),
            ConfigChange::User(user) => format!("USER {user}"),
            ConfigChange::Expose(ports) => {
                let mut ports = ports.clone();
                ports.sort();
                ports.dedup();
                let ports: Vec<String> = ports.iter().map(|port| format!("{port}:{{}}")).collect();
                format!("EXPOSE map[{}]", ports.join(" "))
            }
            ConfigChange::Volume(paths) => format!("VOLUME [{}]", paths.join(" ")),
            ConfigChange::Cmd(words) => format!("CMD {}", quoted(words)),
            ConfigChange::Entrypoint(words) => format!("ENTRYPOINT {}", quoted(words)),
            ConfigChange::Shell(words) => format!("SHELL {}", quoted(words)),
            ConfigChange::StopSignal(signal) => format!("STOPSIGNAL {signal}"),
            ConfigChange::Onbuild(trigger) => format!("ONBUILD {trigger}"),
            ConfigChange::Maintainer(name) => format!("MAINTAINER {name}"),
            ConfigChange::Arg(_) | ConfigChange::Healthcheck(_) => instruction.to_string(),
        },
    }
}

pub(super) fn push_history(config: &mut Value, created: &str, created_by: &str, empty: bool) {
    if !config["history"].is_array() {
        config["history"] = json!([]);
    }
    let mut entry =
        json!({"created": created, "created_by": created_by, "comment": "buildkit.dockerfile.v0"});
    if empty {
        entry["empty_layer"] = json!(true);
    }
    if let Some(history) = config["history"].as_array_mut() {
        history.push(entry);
    }
}

pub(super) fn push_diff_id(config: &mut Value, diff_id: &Digest) {
    if !config["rootfs"]["diff_ids"].is_array() {
        config["rootfs"] = json!({"type": "layers", "diff_ids": []});
    }
    if let Some(ids) = config["rootfs"]["diff_ids"].as_array_mut() {
        ids.push(json!(diff_id.to_string()));
    }
}
