//! Loading and validating a large config through `imgbuild::config::load`,
//! the path every `build`, `validate` and `inspect` takes before launching
//! anything: 200 builders (qemu, docker and ec2), 1000 provisioners (inline
//! shell with templates, scripts, file uploads), most limited with `only`
//! and some applying to every build.
//!
//!   cargo bench --bench config_load
//!
//! The generated config is written to $IMGBUILD_BENCH_CONFIG_DIR (or a
//! directory in the temporary directory), with a stats.json describing it.

use criterion::{Criterion, criterion_group, criterion_main};
use imgbuild::config::{LoadOptions, VariableInputs, load};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

const BUILDERS: usize = 200;
const PROVISIONERS: usize = 1000;
/// Every this many provisioners, one applies to all builds.
const GLOBAL_EVERY: usize = 20;

fn builder_name(i: usize) -> String {
    format!("b{i:03}")
}

fn generate(dir: &Path) -> PathBuf {
    std::fs::create_dir_all(dir.join("scripts")).unwrap();
    std::fs::create_dir_all(dir.join("files")).unwrap();
    std::fs::write(dir.join("base.qcow2"), b"not really a disk image").unwrap();
    for i in 0..10 {
        std::fs::write(
            dir.join(format!("scripts/step{i}.sh")),
            format!("#!/bin/sh\nset -e\necho step {i}\n"),
        )
        .unwrap();
        std::fs::write(
            dir.join(format!("files/file{i}.conf")),
            format!("key{i} = value\n"),
        )
        .unwrap();
    }

    let mut t = String::new();
    t.push_str("[image]\nname = \"big-config\"\nversion = \"1.2.3\"\ndescription = \"config-load benchmark\"\nlabels = { team = \"platform\", tier = \"bench\" }\n\n[variables]\n");
    for i in 0..20 {
        writeln!(
            t,
            "v{i} = {{ default = \"value-{i}\", description = \"variable {i}\" }}"
        )
        .unwrap();
    }
    t.push_str("secret = { default = \"s3cr3t\", sensitive = true }\n\n");
    for i in 0..BUILDERS {
        let name = builder_name(i);
        match i % 3 {
            0 => {
                writeln!(t, "[builders.{name}]\ntype = \"qemu\"\nbase_image = \"base.qcow2\"\noutput_dir = \"out/{{{{ build.name }}}}\"\nformat = \"qcow2\"\nmemory = 1024\ncpus = 2\naccelerator = \"tcg\"\ncloud_init = false\nqemu_args = [\"-cpu\", \"max\"]\n").unwrap();
                writeln!(t, "[builders.{name}.ssh]\nusername = \"imgbuild\"\npassword = \"{{{{ var.secret }}}}\"\ntimeout = \"10m\"\n").unwrap();
            }
            1 => {
                writeln!(t, "[builders.{name}]\ntype = \"docker\"\nimage = \"debian:bookworm-{{{{ var.v{} }}}}\"\npull = \"missing\"\nrepository = \"registry.example.com/team/{name}\"\ntags = [\"latest\", \"{{{{ image.version }}}}\"]\nchanges = [\"ENV APP={name}\", \"LABEL built-by=imgbuild\", \"EXPOSE 8080\", \"WORKDIR /srv\"]\nenv = {{ MODE = \"bench\" }}\n", i % 20).unwrap();
            }
            _ => {
                writeln!(t, "[builders.{name}]\ntype = \"ec2\"\nregion = \"us-east-1\"\nsource_ami = \"ami-0123456789abcdef0\"\ninstance_type = \"t3.micro\"\nami_name = \"{name}-{{{{ image.version }}}}\"\nami_tags = {{ team = \"platform\", build = \"{{{{ build.name }}}}\" }}\nrun_tags = {{ purpose = \"bench\" }}\nami_regions = [\"eu-west-1\"]\n").unwrap();
                writeln!(
                    t,
                    "[builders.{name}.ssh]\nusername = \"admin\"\ntimeout = \"5m\"\n"
                )
                .unwrap();
            }
        }
    }
    let mut instances = 0usize;
    for p in 0..PROVISIONERS {
        t.push_str("[[provision]]\n");
        match p % 4 {
            0 | 1 => {
                writeln!(t, "type = \"shell\"\ninline = [\n  \"echo 'step {p} of {{{{ image.name }}}} {{{{ image.version }}}} on {{{{ build.name }}}}'\",\n  \"printf '%s\\\\n' '{{{{ var.v{} }}}}' > /tmp/p{p}\",\n]\nenv = {{ STEP = \"{p}\", KIND = \"{{{{ build.type }}}}\" }}", p % 20).unwrap();
            }
            2 => {
                writeln!(t, "type = \"shell\"\nscript = \"scripts/step{}.sh\"\nexecute_command = \"sudo {{{{ vars }}}} sh {{{{ path }}}}\"\ntimeout = \"10m\"\nmax_retries = 1", p % 10).unwrap();
            }
            _ => {
                writeln!(t, "type = \"file\"\nsource = \"files/file{}.conf\"\ndestination = \"/etc/app/{p}.conf\"", p % 10).unwrap();
            }
        }
        if p % GLOBAL_EVERY == 0 {
            instances += BUILDERS;
        } else {
            // 1 to 5 builders, spread over the list.
            let count = 1 + p % 5;
            let names: Vec<String> = (0..count)
                .map(|k| format!("\"{}\"", builder_name((p * 7 + k * 41) % BUILDERS)))
                .collect();
            writeln!(t, "only = [{}]", names.join(", ")).unwrap();
            instances += count;
        }
        t.push('\n');
    }
    let path = dir.join("image.toml");
    std::fs::write(&path, &t).unwrap();
    std::fs::write(
        dir.join("stats.json"),
        format!(
            "{{\"builders\": {BUILDERS}, \"provisioners\": {PROVISIONERS}, \"bytes\": {}, \"provisioner_instances\": {instances}}}\n",
            t.len()
        ),
    )
    .unwrap();
    path
}

fn options() -> LoadOptions {
    LoadOptions {
        variables: VariableInputs {
            cli: Vec::new(),
            var_files: Vec::new(),
            environment: Default::default(),
        },
        run_id: "0123456789abcdef".to_owned(),
        started: time::OffsetDateTime::now_utc(),
        only: Vec::new(),
        except: Vec::new(),
    }
}

fn config_load(c: &mut Criterion) {
    let dir = std::env::var_os("IMGBUILD_BENCH_CONFIG_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("imgbuild-bench-config"));
    let path = generate(&dir);
    match load(&path, &options()) {
        Ok(config) => assert_eq!(config.builds.len(), BUILDERS),
        Err(diagnostics) => panic!(
            "the generated config is invalid:\n{}",
            diagnostics.render(false)
        ),
    }
    let mut group = c.benchmark_group("config");
    group.sample_size(20);
    group.measurement_time(Duration::from_secs(10));
    group.bench_function("load_200_builders_1000_provisioners", |b| {
        b.iter(|| load(&path, &options()).unwrap_or_else(|_| unreachable!("validated above")))
    });
    group.finish();
}

criterion_group!(benches, config_load);
criterion_main!(benches);
