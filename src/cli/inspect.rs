//! `imgbuild inspect`: the config as imgbuild understands it — builds,
//! provisioners, variables (sensitive ones masked) and what each build will
//! produce.

use super::{
    ConfigArgs, EXIT_OK, EXIT_USAGE, GlobalOptions, new_run_id, print_result, report_diagnostics,
};
use crate::config::{self, Config};
use crate::ui::OutputFormat;
use clap::Args;
use imgbuild_core::redact::MASK;

#[derive(Args)]
pub struct InspectArgs {
    #[command(flatten)]
    config: ConfigArgs,
}

pub fn run(args: InspectArgs, global: &GlobalOptions) -> i32 {
    let options = args
        .config
        .load_options(&new_run_id(), time::OffsetDateTime::now_utc());
    let config = match config::load(&args.config.config, &options) {
        Ok(config) => config,
        Err(diagnostics) => {
            report_diagnostics(&diagnostics, global);
            return EXIT_USAGE;
        }
    };
    let document = document(&config);

    match global.output {
        OutputFormat::Json => print_result(&document.to_string()),
        OutputFormat::Human => print_result(render_human(&document).trim_end()),
    }
    EXIT_OK
}

/// What `inspect` shows of a loaded config, secrets masked.
pub fn document(config: &Config) -> serde_json::Value {
    let variables: Vec<serde_json::Value> = config
        .variables
        .iter()
        .map(|v| {
            serde_json::json!({
                "name": v.name,
                "value": if v.sensitive { MASK.to_owned() } else { v.value.clone() },
                "sensitive": v.sensitive,
                "description": v.description,
                "source": v.source,
            })
        })
        .collect();
    let builds: Vec<serde_json::Value> = config
        .builds
        .iter()
        .map(|build| {
            let planned = build.builder.planned_artifact(&config.image, &config.dir);
            serde_json::json!({
                "name": build.name,
                "type": build.builder.kind(),
                "config": build.builder.resolved_config(),
                "provisioners": build.provisioner_configs,
                "step_cache": crate::pipeline::plan::cacheability(build),
                "tests": build.test_configs,
                "output": planned,
            })
        })
        .collect();
    let mut document = serde_json::json!({
        "config": config.path,
        "image": config.image,
        "variables": variables,
        "builds": builds,
        "on_test_failure": config.on_test_failure,
        "excluded_builds": config.excluded,
    });
    config.redactor.redact_json(&mut document);
    document
}

fn render_human(document: &serde_json::Value) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let text = |v: &serde_json::Value| match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => String::new(),
        other => other.to_string(),
    };
    let image = &document["image"];
    let _ = writeln!(
        out,
        "image {} {}",
        text(&image["name"]),
        text(&image["version"])
    );
    if let Some(description) = image["description"].as_str() {
        let _ = writeln!(out, "  {description}");
    }
    if let Some(labels) = image["labels"].as_object() {
        for (key, value) in labels {
            let _ = writeln!(out, "  label {key} = {}", text(value));
        }
    }
    out.push('\n');
    let _ = writeln!(out, "variables:");
    for variable in document["variables"].as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "  {} = {}  ({})",
            text(&variable["name"]),
            text(&variable["value"]),
            text(&variable["source"])
        );
    }
    for build in document["builds"].as_array().into_iter().flatten() {
        out.push('\n');
        let _ = writeln!(
            out,
            "build {} ({})",
            text(&build["name"]),
            text(&build["type"])
        );
        let _ = writeln!(out, "  output: {}", text(&build["output"]["description"]));
        let pretty = serde_json::to_string_pretty(&build["config"]).unwrap_or_default();
        for line in pretty.lines() {
            let _ = writeln!(out, "  {line}");
        }
        for (index, provisioner) in build["provisioners"]
            .as_array()
            .into_iter()
            .flatten()
            .enumerate()
        {
            let _ = writeln!(out, "  provisioner {}: {}", index + 1, provisioner);
            let cache = &build["step_cache"][index];
            match cache["why_not"].as_str() {
                None => {
                    let _ = writeln!(out, "    step cache: cacheable");
                }
                Some(why) => {
                    let _ = writeln!(out, "    step cache: not cached: {why}");
                }
            }
        }
        for (index, test) in build["tests"].as_array().into_iter().flatten().enumerate() {
            let _ = writeln!(
                out,
                "  test {}: {}: {}",
                index + 1,
                text(&test["name"]),
                test
            );
        }
    }
    if let Some(excluded) = document["excluded_builds"]
        .as_array()
        .filter(|e| !e.is_empty())
    {
        out.push('\n');
        let _ = writeln!(
            out,
            "excluded by --only/--except: {}",
            excluded.iter().map(text).collect::<Vec<_>>().join(", ")
        );
    }
    out
}
