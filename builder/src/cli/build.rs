//! `kiln build`: build an image from a Dockerfile and a context directory,
//! into kiln's local image store.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::Args;
use kiln_snapshotter::backend::BackendKind;

use crate::config::{NetworkName, Settings};
use crate::engine::{self, progress};
use crate::frontend::Platform;
use crate::image::export::{export, export_platforms, ExportOptions};
use crate::image::OutputSpec;

#[derive(Args, Debug)]
pub struct BuildArgs {
    /// Build context: a directory; `-` for a tar (plain or compressed;
    /// or a Dockerfile alone, with an empty context) on standard input; a
    /// git URL (`https://host/repo.git#ref:subdir`); or an HTTP(S) URL of
    /// a tar or a Dockerfile
    #[arg(value_name = "CONTEXT")]
    context: PathBuf,
    /// Dockerfile (default: CONTEXT/Dockerfile; `-` reads it from standard
    /// input; with a tar context, a path inside the tar)
    #[arg(long, short = 'f', value_name = "FILE")]
    file: Option<PathBuf>,
    /// Name the image (several allowed)
    #[arg(long, short = 't', value_name = "NAME[:TAG]")]
    tag: Vec<String>,
    /// Set a build argument
    #[arg(long, value_name = "K=V")]
    build_arg: Vec<String>,
    /// A named context for FROM/COPY --from: `NAME=DIR` or
    /// `NAME=docker-image://REF` (several allowed)
    #[arg(long, value_name = "NAME=SOURCE")]
    build_context: Vec<String>,
    /// Build this stage and what it needs
    #[arg(long)]
    target: Option<String>,
    /// Do not use the cache
    #[arg(long)]
    no_cache: bool,
    /// Do not use the cache for this stage (several allowed)
    #[arg(long, value_name = "STAGE")]
    no_cache_filter: Vec<String>,
    /// How many steps run at once (default: the number of CPUs)
    #[arg(long, short = 'j')]
    jobs: Option<usize>,
    /// Progress output: auto (tty on a terminal, else plain), plain, tty, rawjson or quiet
    #[arg(long, default_value = "auto", env = "BUILDKIT_PROGRESS")]
    progress: String,
    /// Where the result goes, BuildKit's CSV syntax: type=image|oci|docker|local|tar,dest=PATH|-,...
    /// (several allowed; default: the local image store under the -t names)
    #[arg(long, short = 'o', value_name = "SPEC")]
    output: Vec<String>,
    /// Snapshotter backend: auto, fuse, overlay or copy (default: kiln.toml's
    /// `snapshotter`, else auto)
    #[arg(long)]
    snapshotter: Option<String>,
    /// Target platforms, comma-separated or repeated (`linux/amd64,linux/arm64`):
    /// one build per platform, combined into an OCI image index; foreign
    /// RUN steps run under qemu-user (see `kiln info`)
    #[arg(long, value_name = "OS/ARCH[/VARIANT],...")]
    platform: Vec<String>,
    /// Network of RUN steps: `sandbox` (own network namespace, outbound
    /// through pasta or slirp4netns; `default` is the same, as buildx
    /// names it), `none` (only loopback) or `host` (needs --allow
    /// network.host); RUN --network overrides it per step (default:
    /// kiln.toml's `network`, else sandbox)
    #[arg(long, value_name = "MODE")]
    network: Option<String>,
    /// Under --network=sandbox, let steps reach the host's loopback
    /// services (through the gateway address), link-local addresses
    /// (169.254.0.0/16: cloud metadata) and the host's own addresses,
    /// all blocked by default
    #[arg(long)]
    allow_host_loopback: bool,
    /// Add NAME:IP (or NAME=IP) to RUN steps' /etc/hosts; several allowed
    #[arg(long = "add-host", value_name = "NAME:IP")]
    add_host: Vec<String>,
    /// The largest file ADD <url> downloads (e.g. 512MB, 8GB)
    #[arg(long = "add-max-size", value_name = "SIZE", default_value = "4GiB")]
    add_max_size: String,
    /// Grant an entitlement: network.host
    #[arg(long, value_name = "ENTITLEMENT")]
    allow: Vec<String>,
    /// Give RUN --mount=type=secret a secret: id=ID,src=FILE, id=ID,env=VAR,
    /// or id=ID (the variable ID, else a file named ID); several allowed
    #[arg(long, value_name = "id=ID[,src=FILE|,env=VAR]")]
    secret: Vec<String>,
    /// Give RUN --mount=type=ssh an agent: `default` ($SSH_AUTH_SOCK),
    /// ID=SOCKET, or ID=KEYFILE[,KEYFILE...] served by kiln; several allowed
    #[arg(long, value_name = "ID[=SOCKET|KEY[,KEY...]]")]
    ssh: Vec<String>,
    /// Export the build cache: type=local,dest=DIR or type=registry,ref=REF
    /// (each with [,mode=min|max][,ignore-error=true]), a bare REF (as
    /// type=registry,ref=REF), or type=inline (records in the image config)
    #[arg(long, value_name = "SPEC")]
    cache_to: Vec<String>,
    /// Import a build cache: type=local,src=DIR, type=registry,ref=REF or a
    /// bare REF (a cache manifest, or an image built with type=inline)
    #[arg(long, value_name = "SPEC")]
    cache_from: Vec<String>,
    /// Push the image to the registry of each -t name after the build
    #[arg(long)]
    push: bool,
    /// Store the image in kiln's local image store (buildx's `--load`;
    /// kiln's store is where `kiln run`, `kiln images` and later builds
    /// find it), also when -o names other outputs
    #[arg(long)]
    load: bool,
    /// Write the image ID to FILE, as docker does: the config digest (a
    /// multi-platform build's index digest)
    #[arg(long, value_name = "FILE")]
    iidfile: Option<PathBuf>,
    /// Write the build's result as JSON to FILE, as buildx does:
    /// containerimage.digest, containerimage.config.digest,
    /// containerimage.descriptor and image.name
    #[arg(long = "metadata-file", value_name = "FILE")]
    metadata_file: Option<PathBuf>,
    /// No progress output; print only the image ID on success
    #[arg(long, short = 'q')]
    quiet: bool,
    /// Set a label on the image (K=V; several allowed), as LABEL in the
    /// target stage does, without a history entry
    #[arg(long, value_name = "K=V")]
    label: Vec<String>,
    /// Resolve FROM images with a tag against their registry even when the
    /// store has the name (without it the stored image is used)
    #[arg(long)]
    pull: bool,
    /// Size of /dev/shm in RUN steps (e.g. 128m; default 64m)
    #[arg(long = "shm-size", value_name = "SIZE")]
    shm_size: Option<String>,
    /// A resource limit of RUN steps, as docker: NAME=SOFT[:HARD], e.g.
    /// nofile=1024:4096 (several allowed; over kiln.toml's `[limits]`)
    #[arg(long, value_name = "NAME=SOFT[:HARD]")]
    ulimit: Vec<String>,
    /// Kill a RUN step (its whole PID namespace) that runs longer than
    /// this, e.g. 30m, 1h30m (0: no limit); the build fails naming the step
    #[arg(long, value_name = "DURATION", value_parser = crate::units::parse_duration)]
    step_timeout: Option<std::time::Duration>,
    /// Fail the build when it runs longer than this, killing the step
    /// running then (0: no limit)
    #[arg(long, value_name = "DURATION", value_parser = crate::units::parse_duration)]
    timeout: Option<std::time::Duration>,
    /// Memory limit of each RUN step (e.g. 2g; 0: none); needs cgroup v2
    /// controllers delegated to the user (see `kiln info`), else an error
    #[arg(long, value_name = "SIZE")]
    memory: Option<String>,
    /// Task limit of each RUN step (0: none); needs delegated cgroup v2
    /// controllers
    #[arg(long, value_name = "N")]
    pids_limit: Option<u64>,
    /// CPU limit of each RUN step (e.g. 1.5; 0: none); needs delegated
    /// cgroup v2 controllers
    #[arg(long, value_name = "N")]
    cpus: Option<f64>,
    /// An annotation on the image outputs, as buildx:
    /// [LEVEL[,LEVEL...]][\[PLATFORM\]]:KEY=VALUE with LEVEL manifest (the
    /// default), index, manifest-descriptor or index-descriptor
    #[arg(long, value_name = "[LEVEL:]KEY=VALUE")]
    annotation: Vec<String>,
    /// Run the build checks (BuildKit's lint rules) on every stage and
    /// print what they find, with the Dockerfile lines, instead of
    /// building (as `--call check`); exits 1 when they find anything
    #[arg(long)]
    check: bool,
    /// What to do instead of building, as buildx: `check` (as --check) or
    /// `build` (the default)
    #[arg(long, value_name = "METHOD")]
    call: Option<String>,
    /// buildx's provenance attestation: kiln makes none yet, so only
    /// `false` (or `0`) is accepted; anything else is an error
    #[arg(long, value_name = "VALUE", num_args = 0..=1, default_missing_value = "true", require_equals = true)]
    provenance: Option<String>,
    /// buildx's SBOM attestation: as --provenance, only `false`
    #[arg(long, value_name = "VALUE", num_args = 0..=1, default_missing_value = "true", require_equals = true)]
    sbom: Option<String>,
    /// buildx's `--attest type=...`: only `type=provenance|sbom,disabled=true`
    #[arg(long, value_name = "SPEC")]
    attest: Vec<String>,
}

pub fn run(
    root: Option<&std::path::Path>,
    insecure: &[String],
    mut settings: Settings,
    mut args: BuildArgs,
) -> anyhow::Result<i32> {
    let started = std::time::Instant::now();
    check_flags(&mut settings, &args)?;
    // disarmed when this function returns, whichever way
    let _watchdog = settings.timeout.value.map(|l| Watchdog::arm(l, started));
    let state_root = crate::image::StateDir::open(root)?;
    let _stdin = super::context_input::take(&mut args.context, &mut args.file, state_root.root())?;
    let session = session(&args)?;
    let remote = super::context_input::Remote {
        network: network(&settings, &args)?.0,
        keep_git_dir: build_args(&args.build_arg)
            .get("BUILDKIT_CONTEXT_KEEP_GIT_DIR")
            .is_some_and(|v| matches!(v.as_str(), "1" | "true")),
        state_root: state_root.root(),
        ssh: session.agents.get("default").cloned(),
    };
    contexts_under_policy(&session, &mut args)?;
    let mut times = super::epoch::SourceTimes::default();
    let mut _fetched = Vec::new();
    if super::context_input::is_remote(&args.context) {
        let (input, epoch) = remote.take(&mut args.context, &mut args.file)?;
        _fetched.push(input);
        times.context = epoch;
    }
    // --build-context NAME=URL: fetched now, then a directory
    for c in &mut args.build_context {
        let Some((name, url)) = c.split_once('=') else {
            continue;
        };
        let remote_url = !url.starts_with("docker-image://")
            && !url.starts_with("oci-layout://")
            && super::context_input::is_remote(std::path::Path::new(url));
        if !remote_url {
            times.named.insert(name.to_string(), None);
            continue;
        }
        let (input, dir, epoch) = remote.named(name, url)?;
        times.named.insert(name.to_string(), epoch);
        *c = format!("{name}={}", dir.display());
        _fetched.push(input);
    }
    let mode = if args.quiet {
        progress::Mode::Quiet
    } else {
        progress::Mode::parse_for_stderr(&args.progress).map_err(anyhow::Error::msg)?
    };
    let call = call(&args)?;
    let sources = Sources {
        session,
        times: &times,
        remote: &remote,
        started,
    };
    let mut opts = build_options(root, insecure, &args, &settings, sources)?;
    opts.check = matches!(call, Some(Call::Check));
    let outputs = outputs(&args)?;
    let platforms = platforms(&args)?;
    if platforms.len() <= 1 {
        index_annotations_need_an_index(&outputs)?;
    }
    let progress = Arc::new(progress::Progress::new(
        mode,
        Box::new(std::io::stderr()),
        Vec::new(),
    ));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    if let Some(call) = &call {
        return answer(call, &runtime, &opts, &progress);
    }
    let dockerfile = opts.dockerfile.clone();
    let ex = Exporting {
        args: &args,
        outputs: &outputs,
        export_opts: ExportOptions {
            source_date_epoch: opts.source_date_epoch,
        },
        progress: &progress,
        insecure,
    };
    let result = if platforms.len() > 1 {
        build_multi_platform(&runtime, opts, &platforms, &ex)
    } else {
        build_one_platform(&runtime, opts, platforms.first(), &ex)
    };
    // a failed step's lines, as buildx shows them above the error
    if let Some(text) = result
        .as_ref()
        .err()
        .and_then(|e| step_source(e, &dockerfile))
    {
        eprint!("{text}");
    }
    // the build checks' findings, after the build (also a failed one)
    let findings = progress.take_lint();
    if matches!(mode, progress::Mode::Plain | progress::Mode::Tty) {
        if let Some(text) = super::check::summary(&findings) {
            eprint!("{text}");
        }
    }
    result
}

/// The Dockerfile lines of the step `e` failed in, with their
/// neighbours, as BuildKit prints a failed step's source.
fn step_source(e: &anyhow::Error, dockerfile: &std::path::Path) -> Option<String> {
    let engine::Error::Step {
        file,
        line,
        end_line,
        ..
    } = e.downcast_ref::<engine::Error>()?
    else {
        return None;
    };
    let source = std::fs::read_to_string(dockerfile).ok()?;
    let lines: Vec<&str> = source.split('\n').collect();
    let mut out = String::new();
    super::check::snippet(&mut out, file, &lines, *line, *end_line);
    (!out.is_empty()).then_some(out)
}

/// `--provenance`, `--sbom`, `--attest`: kiln makes no attestations yet
/// (issue 21), so a CI script's `--provenance=false` or `--sbom=false`
/// (asking for none) is taken, and asking for one is an error, never a
/// build without it.
fn attestations(args: &BuildArgs) -> anyhow::Result<()> {
    let off = |v: &str| matches!(v, "false" | "0");
    for (flag, value) in [("--provenance", &args.provenance), ("--sbom", &args.sbom)] {
        if let Some(v) = value.as_deref().filter(|v| !off(v)) {
            bail!(
                "{flag}={v}: kiln does not make attestations yet; use {flag}=false or leave it out"
            );
        }
    }
    for spec in &args.attest {
        let fields = crate::options::split(spec, crate::options::Quotes::FieldStart)?;
        let mut kind = None;
        let mut disabled = false;
        for f in &fields {
            match f.split_once('=') {
                Some(("type", t)) if matches!(t, "provenance" | "sbom") => kind = Some(t),
                Some(("disabled", v)) => disabled = matches!(v, "true" | "1"),
                _ => {}
            }
        }
        if kind.is_none() || !disabled {
            bail!("--attest {spec}: kiln does not make attestations yet; only type=provenance|sbom,disabled=true is taken");
        }
    }
    Ok(())
}

/// `--check` or `--call METHOD[,format=json|text]`: what to do instead
/// of building. None: build.
fn call(args: &BuildArgs) -> anyhow::Result<Option<Call>> {
    let value = match (&args.call, args.check) {
        (Some(c), true) if c != "check" => bail!("--check and --call {c}: give one of the two"),
        (_, true) => "check",
        (Some(c), false) => c.as_str(),
        (None, false) => return Ok(None),
    };
    let mut parts = value.split(',');
    let method = parts.next().unwrap_or("");
    let mut json = false;
    for opt in parts {
        match opt.split_once('=') {
            Some(("format", "json")) if method != "check" => json = true,
            Some(("format", "text" | "")) if method != "check" => json = false,
            Some(("format", f)) if method != "check" => {
                bail!("--call {value}: unknown format {f:?}; use json or text")
            }
            _ if method == "check" => bail!(
                "--call {value}: only plain `check` is supported (no format or ignore options yet)"
            ),
            _ => {
                bail!("--call {value}: unknown option {opt:?}; the only option is format=json|text")
            }
        }
    }
    match method {
        "build" if value == "build" => Ok(None),
        "check" => Ok(Some(Call::Check)),
        "outline" => Ok(Some(Call::Outline { json })),
        "targets" => Ok(Some(Call::Targets { json })),
        "subrequests.describe" => Ok(Some(Call::Describe { json })),
        // as BuildKit's frontend answers a request it does not know
        m => bail!(
            "unsupported request frontend.{m}; kiln answers build, check, outline, targets and subrequests.describe"
        ),
    }
}

/// What `--call` asked for instead of a build.
enum Call {
    Check,
    Outline { json: bool },
    Targets { json: bool },
    Describe { json: bool },
}

/// The result of a `--call` request on standard output: its JSON (as
/// BuildKit's `result.json`) or its text.
fn print_result<T: serde::Serialize>(
    json: bool,
    value: &T,
    text: impl FnOnce() -> String,
) -> anyhow::Result<i32> {
    if json {
        println!("{}", serde_json::to_string_pretty(value)?);
    } else {
        print!("{}", text());
    }
    Ok(0)
}

/// `--call outline`, `targets` or `subrequests.describe`.
fn answer(
    call: &Call,
    runtime: &tokio::runtime::Runtime,
    opts: &engine::BuildOptions,
    progress: &Arc<progress::Progress>,
) -> anyhow::Result<i32> {
    use crate::frontend::outline;
    match *call {
        Call::Check => check(runtime, opts, progress),
        Call::Outline { json } => {
            let o = runtime.block_on(engine::outline(opts, progress))?;
            print_result(json, &o, || o.text())
        }
        Call::Targets { json } => {
            let source = std::fs::read(&opts.dockerfile)
                .with_context(|| format!("reading {}", opts.dockerfile.display()))?;
            let file = opts.dockerfile.display().to_string();
            let ast = crate::frontend::parse(&source, &file)?;
            let t = outline::targets(&ast, &source);
            print_result(json, &t, || t.text())
        }
        Call::Describe { json } => {
            let d = outline::describe();
            print_result(json, &d, || outline::describe_text(&d))
        }
    }
}

/// `kiln build --check`: the report on standard output; 1 when the
/// checks found anything, as buildx exits.
fn check(
    runtime: &tokio::runtime::Runtime,
    opts: &engine::BuildOptions,
    progress: &Arc<progress::Progress>,
) -> anyhow::Result<i32> {
    let result = runtime.block_on(engine::check(opts, progress));
    let findings = progress.take_lint();
    let file = opts
        .dockerfile
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_else(|| "Dockerfile".into());
    let source = std::fs::read_to_string(&opts.dockerfile).unwrap_or_default();
    print!("{}", super::check::report(&findings, &file, &source));
    if result.is_err() && !findings.is_empty() {
        println!();
    }
    result?;
    Ok(i32::from(!findings.is_empty()))
}

/// What the outputs of a build need besides the image: the command line,
/// the outputs asked for, and where progress goes.
struct Exporting<'a> {
    args: &'a BuildArgs,
    outputs: &'a [OutputSpec],
    export_opts: ExportOptions,
    progress: &'a Arc<progress::Progress>,
    insecure: &'a [String],
}

impl Exporting<'_> {
    /// Push `exported`'s names when `spec` asks (`push=true`); what the
    /// registry then has replaces its manifest, as buildx reports it.
    fn push(
        &self,
        snap: &Arc<kiln_snapshotter::snapshot::Snapshotter>,
        spec: &OutputSpec,
        exported: &mut crate::image::export::Exported,
    ) -> anyhow::Result<()> {
        if spec.push {
            // the exporter named the image in the store; push those names
            let source = exported.manifest.digest().to_string();
            exported.manifest = super::registry::push_names(
                snap,
                self.insecure,
                &source,
                &exported.names,
                spec.push_by_digest,
                self.progress,
            )?;
        }
        Ok(())
    }
}

/// `index` and `index-descriptor` annotations on a build that writes no
/// index are an error (nothing would carry them).
fn index_annotations_need_an_index(outputs: &[OutputSpec]) -> anyhow::Result<()> {
    use crate::image::output::AnnotationLevel::{Index, IndexDescriptor};
    if let Some(a) = outputs
        .iter()
        .flat_map(|o| &o.annotations)
        .find(|a| a.levels.contains(&Index) || a.levels.contains(&IndexDescriptor))
    {
        bail!(
            "--annotation {}: a single-platform image has no index; use the manifest or manifest-descriptor level, or build several platforms",
            a.key
        );
    }
    Ok(())
}

/// Build one platform (`platform`, else the host's) and write its outputs.
fn build_one_platform(
    runtime: &tokio::runtime::Runtime,
    opts: engine::BuildOptions,
    platform: Option<&Platform>,
    ex: &Exporting<'_>,
) -> anyhow::Result<i32> {
    let progress = Arc::clone(ex.progress);
    let built = match platform {
        Some(p) => {
            runtime
                .block_on(engine::build_platforms(
                    opts,
                    std::slice::from_ref(p),
                    progress,
                ))?
                .remove(0)
                .1
        }
        None => runtime.block_on(engine::build(opts, progress))?,
    };
    let store = crate::image::ImageStore::new(&built.snap);
    let image = store.get(&built.manifest, None)?;
    let mut reported = None;
    let mut pushed = None;
    for spec in ex.outputs {
        let t = std::time::Instant::now();
        let mut exported = export(&store, &image, spec, &ex.export_opts)?;
        exported_line(ex.progress, spec, t);
        ex.push(&built.snap, spec, &mut exported)?;
        if spec.push {
            pushed.get_or_insert(exported.manifest.clone());
        }
        if reported.is_none() && names_an_image(spec) {
            reported = Some(exported);
        }
    }
    // --load without a name: kept in the store as an unnamed image (listed
    // as <none>, removed by `kiln prune --all`), as docker keeps one
    if ex.args.load && ex.args.tag.is_empty() {
        store.add_unnamed(&image.target)?;
    }
    // the ID buildx reports: the config digest the image output wrote
    let image_id = reported
        .as_ref()
        .map_or_else(|| built.config_digest.to_string(), |e| e.config.to_string());
    write_reports(ex.args, &image_id, metadata(reported.as_ref(), true))?;
    if ex.args.quiet {
        println!("{image_id}");
    } else {
        // the pushed manifest's digest when the image was pushed (the one a
        // `FROM name@digest` can use), else the stored one
        let digest = pushed.as_ref().unwrap_or(&built.manifest).digest();
        println!("{digest}");
    }
    Ok(0)
}

/// Whether an output writes an image buildx reports in its metadata
/// (image, oci, docker), as opposed to a file tree (local, tar).
fn names_an_image(spec: &OutputSpec) -> bool {
    use crate::image::output::OutputType;
    matches!(
        spec.kind,
        OutputType::Image | OutputType::Oci | OutputType::Docker
    )
}

/// The `--metadata-file` JSON of a build whose image output wrote
/// `exported` (nothing when only file trees were written), with the keys
/// buildx writes. `single`: one platform, so there is one config.
fn metadata(exported: Option<&crate::image::export::Exported>, single: bool) -> serde_json::Value {
    let mut m = serde_json::Map::new();
    if let Some(e) = exported {
        if single {
            m.insert(
                "containerimage.config.digest".into(),
                e.config.to_string().into(),
            );
        }
        m.insert(
            "containerimage.digest".into(),
            e.manifest.digest().to_string().into(),
        );
        m.insert(
            "containerimage.descriptor".into(),
            serde_json::json!({
                "mediaType": e.manifest.media_type().to_string(),
                "digest": e.manifest.digest().to_string(),
                "size": e.manifest.size(),
            }),
        );
        if !e.names.is_empty() {
            m.insert("image.name".into(), e.names.join(",").into());
        }
    }
    serde_json::Value::Object(m)
}

/// `--iidfile` (the ID alone, no newline, as docker writes it) and
/// `--metadata-file` (indented JSON, keys sorted, as buildx writes it).
fn write_reports(
    args: &BuildArgs,
    image_id: &str,
    metadata: serde_json::Value,
) -> anyhow::Result<()> {
    if let Some(path) = &args.iidfile {
        std::fs::write(path, image_id).with_context(|| format!("--iidfile {}", path.display()))?;
    }
    if let Some(path) = &args.metadata_file {
        let mut text = serde_json::to_vec_pretty(&metadata).context("--metadata-file")?;
        text.push(b'\n');
        std::fs::write(path, text)
            .with_context(|| format!("--metadata-file {}", path.display()))?;
    }
    Ok(())
}

/// `--timeout`: a RUN step running at the deadline is killed by its own
/// limit and fails the build; anything else (a pull, a copy, an export)
/// is stopped by this thread a moment later, and kiln exits. Steps die
/// with kiln (their parent-death signal); the store stays consistent, as
/// after any crash. Disarmed when dropped: a build that ended in time is
/// never stopped afterwards.
struct Watchdog {
    done: Arc<std::sync::atomic::AtomicBool>,
}

impl Watchdog {
    fn arm(limit: std::time::Duration, started: std::time::Instant) -> Watchdog {
        const GRACE: std::time::Duration = std::time::Duration::from_secs(2);
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let seen = Arc::clone(&done);
        std::thread::spawn(move || {
            std::thread::sleep(
                (started + limit + GRACE).saturating_duration_since(std::time::Instant::now()),
            );
            if seen.load(std::sync::atomic::Ordering::SeqCst) {
                return;
            }
            eprintln!(
                "kiln: error: the build ran past --timeout {}s and was stopped",
                limit.as_secs_f64()
            );
            std::process::exit(1);
        });
        Watchdog { done }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.done.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// What the command line asks, checked before anything runs: its
/// settings over kiln.toml's (each against what the host file enforces)
/// and the attestation flags.
fn check_flags(settings: &mut Settings, args: &BuildArgs) -> anyhow::Result<()> {
    if let Some(n) = &args.network {
        let name = match n.as_str() {
            // `default` is buildx's name for the build's default network
            "default" => "sandbox",
            other => other,
        };
        settings.flag("network", NetworkName(name.into()), "--network")?;
    }
    if args.allow.iter().any(|a| a == "network.host") {
        settings.check_network_grant("--allow network.host", "host")?;
    }
    if args.allow_host_loopback {
        // the host's own services: as open as its network
        settings.check_network_grant("--allow-host-loopback", "host")?;
    }
    if let Some(v) = &args.snapshotter {
        settings.flag("snapshotter", v.clone(), "--snapshotter")?;
    }
    if let Some(j) = args.jobs {
        if j == 0 {
            bail!("--jobs 0: at least one step must run at a time");
        }
        settings.flag("jobs", Some(j), "--jobs")?;
    }
    // 0 clears a limit kiln.toml set (unless the host enforces it)
    if let Some(d) = args.step_timeout {
        let d = (!d.is_zero()).then_some(d);
        settings.flag("limits.step-timeout", d, "--step-timeout")?;
    }
    if let Some(d) = args.timeout {
        settings.flag("limits.timeout", (!d.is_zero()).then_some(d), "--timeout")?;
    }
    for u in &args.ulimit {
        let r = kiln_runtime::spec::Rlimit::parse_docker(u)?;
        let name = u.split_once('=').map_or("", |(n, _)| n);
        settings.flag_ulimit(name, r)?;
    }
    if let Some(m) = &args.memory {
        let bytes = crate::units::parse_size(m).context("--memory")?;
        settings.flag("limits.memory", (bytes > 0).then_some(bytes), "--memory")?;
    }
    if let Some(p) = args.pids_limit {
        settings.flag("limits.pids", (p > 0).then_some(p), "--pids-limit")?;
    }
    if let Some(c) = args.cpus {
        if !(c >= 0.0 && c.is_finite()) {
            bail!("--cpus {c}: a number of CPUs (0: unlimited)");
        }
        settings.flag("limits.cpus", (c > 0.0).then_some(c), "--cpus")?;
    }
    attestations(args)
}

/// Memory, task and CPU limits: each RUN step gets a cgroup of its own
/// under the cgroup the host delegates to the user; without delegation
/// such a limit is refused, never ignored.
fn step_cgroups(
    settings: &Settings,
) -> anyhow::Result<Option<Arc<kiln_runtime::cgroup::StepCgroups>>> {
    let limits = kiln_runtime::cgroup::Limits {
        memory: settings.memory.value,
        pids: settings.pids.value,
        cpus: settings.cpus.value,
    };
    let asked: Vec<String> = [
        ("memory", limits.memory.is_some(), &settings.memory.from),
        ("pids", limits.pids.is_some(), &settings.pids.from),
        ("cpus", limits.cpus.is_some(), &settings.cpus.from),
    ]
    .iter()
    .filter(|(_, set, _)| *set)
    .map(|(k, _, from)| format!("limits.{k} (from {from})"))
    .collect();
    if asked.is_empty() {
        return Ok(None);
    }
    let delegated = match kiln_runtime::cgroup::detect() {
        Ok(d) => d,
        Err(why) => bail!(
            "cannot enforce {}: {why}; kiln enforces rlimits only here (--ulimit, kiln.toml [limits] nofile, nproc, fsize, core)",
            asked.join(", ")
        ),
    };
    let cgroups = delegated
        .prepare(limits)
        .with_context(|| format!("cannot enforce {}", asked.join(", ")))?;
    Ok(Some(Arc::new(cgroups)))
}

/// The build's default network and whether `network.host` is granted,
/// checked as every step checks them.
fn network(settings: &Settings, args: &BuildArgs) -> anyhow::Result<(kiln_runtime::Network, bool)> {
    let allow_network_host = entitlements(&args.allow)?;
    let network_name = settings.network.value.0.as_str();
    let network = kiln_runtime::Network::parse(network_name, args.allow_host_loopback)?;
    // the same check every step makes, once before anything runs
    crate::engine::entitled_network(None, network, allow_network_host)?;
    Ok((network, allow_network_host))
}

/// The source policy on the build context and the `--build-context`s:
/// a denied one is an error; a named context the policy converts to an
/// image, an OCI layout, a URL or another named directory (`local://NAME`,
/// `local://context` the build context) becomes that.
fn contexts_under_policy(
    session: &crate::session::Session,
    args: &mut BuildArgs,
) -> anyhow::Result<()> {
    use crate::session::source_policy::{PolicyError, Source};
    if session.policy.is_none() {
        return Ok(());
    }
    let ident = |name: &str, value: &str| -> Source {
        if let Some(r) = value.strip_prefix("docker-image://") {
            Source::image(r)
        } else if crate::frontend::instructions::is_git(value) {
            Source::git(value, value.split('#').next().unwrap_or(value))
        } else if value.contains("://") {
            Source::new(value)
        } else {
            Source::new(format!("local://{name}"))
        }
    };
    let context = args.context.to_string_lossy().into_owned();
    for src in [
        ident("context", &context),
        Source::new("local://dockerfile"),
    ] {
        let got = session.source(src.clone())?;
        if got != src {
            return Err(PolicyError::Unsupported {
                ident: src.identifier,
                to: got.identifier,
                why: "kiln cannot follow: it does not convert the build context or the Dockerfile (a rule may allow or deny them)".into(),
            }
            .into());
        }
    }
    // the named directories, by name, as given
    let mut dirs: BTreeMap<String, String> = named_contexts(&args.build_context)?
        .into_iter()
        .filter(|(_, v)| !v.contains("://") && !v.starts_with("git@"))
        .collect();
    dirs.entry("context".into()).or_insert(context);
    for c in &mut args.build_context {
        let Some((name, value)) = c.split_once('=') else {
            continue;
        };
        let src = ident(name, value);
        let got = session.source(src.clone())?;
        if got == src {
            continue;
        }
        let to = &got.identifier;
        let new = if let Some(n) = to.strip_prefix("local://") {
            dirs.get(n)
                .cloned()
                .ok_or_else(|| PolicyError::Unsupported {
                    ident: src.identifier.clone(),
                    to: to.clone(),
                    why: format!("names no --build-context directory {n:?}"),
                })?
        } else if ["docker-image://", "oci-layout://", "http://", "https://"]
            .iter()
            .any(|p| to.starts_with(p))
        {
            to.clone()
        } else {
            return Err(PolicyError::Unsupported {
                ident: src.identifier,
                to: to.clone(),
                why: "is not an image, OCI layout, URL or named directory".into(),
            }
            .into());
        };
        *c = format!("{name}={new}");
    }
    Ok(())
}

/// What the build's sources need besides the command line: the
/// session's secrets and agents, and the times of the remote sources
/// (for SOURCE_DATE_EPOCH) with the means to fetch a stage's.
struct Sources<'a> {
    session: crate::session::Session,
    times: &'a super::epoch::SourceTimes,
    remote: &'a super::context_input::Remote<'a>,
    /// when the build started: `--timeout` counts from here
    started: std::time::Instant,
}

fn build_options(
    root: Option<&std::path::Path>,
    insecure: &[String],
    args: &BuildArgs,
    settings: &Settings,
    sources: Sources<'_>,
) -> anyhow::Result<engine::BuildOptions> {
    let backend = match settings.snapshotter.value.as_str() {
        "auto" => None,
        "fuse" => Some(BackendKind::Fuse),
        "overlay" => Some(BackendKind::Overlay),
        "copy" => Some(BackendKind::Copy),
        other => bail!("unknown --snapshotter {other:?}: use auto, fuse, overlay or copy"),
    };
    let (network, allow_network_host) = network(settings, args)?;
    if args.pull && network == kiln_runtime::Network::None {
        bail!(
            "--pull asks the registries, and --network=none fetches nothing: drop one of the two"
        );
    }
    let mut build_args = build_args(&args.build_arg);
    let context = std::path::absolute(&args.context)?;
    let dockerfile = match &args.file {
        Some(f) => std::path::absolute(f)?,
        // as BuildKit: a lower-case `dockerfile` when there is no
        // `Dockerfile`
        None if !context.join("Dockerfile").exists() && context.join("dockerfile").is_file() => {
            context.join("dockerfile")
        }
        None => context.join("Dockerfile"),
    };
    let epoch = source_date_epoch(&mut build_args, &dockerfile, &sources)?;
    let named_contexts = named_contexts(&args.build_context)?;
    Ok(engine::BuildOptions {
        session: Arc::new(sources.session),
        cache_to: args
            .cache_to
            .iter()
            .map(|s| engine::remote_cache::Export::parse(s))
            .collect::<Result<Vec<_>, _>>()?,
        cache_from: args
            .cache_from
            .iter()
            .map(|s| engine::remote_cache::Import::parse(s))
            .collect::<Result<Vec<_>, _>>()?,
        named_contexts,
        context,
        dockerfile,
        build_args,
        target: args.target.clone(),
        no_cache: args.no_cache,
        no_cache_filter: args.no_cache_filter.clone(),
        jobs: settings.jobs.value.unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2)
        }),
        state: crate::image::StateDir::open(root)?,
        backend,
        network,
        allow_network_host,
        extra_hosts: args
            .add_host
            .iter()
            .map(|h| parse_add_host(h))
            .collect::<anyhow::Result<_>>()?,
        add_max_size: crate::units::parse_size(&args.add_max_size).context("--add-max-size")?,
        source_date_epoch: epoch,
        // SOURCE_DATE_EPOCH also clamps the time of every file in the
        // layers kiln writes, so two builds of the same inputs give the
        // same digest (BuildKit needs rewrite-timestamp=true for that).
        rewrite_timestamp: epoch.is_some(),
        // FROM names missing from the store are pulled with this client
        registry: Some(super::registry::client(insecure)?),
        platform: None,
        labels: labels(&args.label)?,
        pull: args.pull,
        shm_size: args
            .shm_size
            .as_deref()
            .map(|s| crate::units::parse_size(s).context("--shm-size"))
            .transpose()?,
        // the cache key holds what a user set (as BuildKit's exec op);
        // kiln's own defaults, like its seccomp profile, are not keyed,
        // so caches stay shared between hosts whose hard limits differ
        ulimits: ulimits(settings, false),
        default_ulimits: ulimits(settings, true),
        check: false,
        step_cgroups: step_cgroups(settings)?,
        time_limits: engine::exec::TimeLimits {
            step: settings.step_timeout.value,
            build: settings.timeout.value.map(|d| (d, sources.started + d)),
        },
    })
}

/// The step rlimits kiln.toml and `--ulimit` set (`defaults` false), or
/// kiln's own defaults that neither overrode (`defaults` true).
fn ulimits(settings: &Settings, defaults: bool) -> Vec<kiln_runtime::spec::Rlimit> {
    settings
        .ulimits
        .values()
        .filter(|u| (u.from == crate::config::Origin::Default) == defaults)
        .map(|u| u.value)
        .collect()
}

/// `--label K=V`, in order (a later K wins).
fn labels(flags: &[String]) -> anyhow::Result<BTreeMap<String, String>> {
    flags
        .iter()
        .map(|l| {
            l.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .with_context(|| format!("--label {l:?}: expected KEY=VALUE"))
        })
        .collect()
}

/// `--allow`: whether network.host is granted.
fn entitlements(allow: &[String]) -> anyhow::Result<bool> {
    let mut allow_network_host = false;
    for a in allow {
        match a.as_str() {
            "network.host" => allow_network_host = true,
            "security.insecure" => {
                bail!("--allow security.insecure: kiln never runs a step privileged")
            }
            other => bail!("unknown entitlement {other:?}: kiln knows network.host"),
        }
    }
    Ok(allow_network_host)
}

/// `--build-arg K=V`, and `--build-arg K`, which takes K from the
/// environment as docker does (and is dropped when unset).
pub(crate) fn build_args(flags: &[String]) -> BTreeMap<String, String> {
    let mut build_args = BTreeMap::new();
    for a in flags {
        match a.split_once('=') {
            Some((k, v)) => {
                build_args.insert(k.to_string(), v.to_string());
            }
            None => {
                if let Ok(v) = std::env::var(a) {
                    build_args.insert(a.clone(), v);
                }
            }
        }
    }
    build_args
}

/// `--build-context NAME=SOURCE`, by name.
pub(crate) fn named_contexts(flags: &[String]) -> anyhow::Result<BTreeMap<String, String>> {
    flags
        .iter()
        .map(|c| {
            c.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .with_context(|| format!("--build-context {c:?}: expected NAME=SOURCE"))
        })
        .collect()
}

/// SOURCE_DATE_EPOCH, from the build args, else the environment, else
/// the Dockerfile's default, resolved as BuildKit resolves it
/// ([`super::epoch`]); a value that names a source becomes the build
/// arg's value (seconds, or empty when the source has no time).
fn source_date_epoch(
    build_args: &mut BTreeMap<String, String>,
    dockerfile: &std::path::Path,
    sources: &Sources<'_>,
) -> anyhow::Result<Option<i64>> {
    let Some(value) = build_args
        .get("SOURCE_DATE_EPOCH")
        .cloned()
        .or_else(|| std::env::var("SOURCE_DATE_EPOCH").ok())
        .or_else(|| dockerfile_epoch(dockerfile))
    else {
        return Ok(None);
    };
    let epoch = super::epoch::resolve(
        &value,
        sources.times,
        dockerfile,
        build_args,
        sources.remote,
    )?;
    if value.parse::<i64>().is_err() && !value.is_empty() {
        build_args.insert(
            "SOURCE_DATE_EPOCH".into(),
            epoch.map(|e| e.to_string()).unwrap_or_default(),
        );
    }
    Ok(epoch)
}

/// The default of a global `ARG SOURCE_DATE_EPOCH=...` in the Dockerfile,
/// which BuildKit takes as the build's epoch when no build arg sets it.
/// (A Dockerfile that does not parse fails the build later, with its
/// error.)
fn dockerfile_epoch(dockerfile: &std::path::Path) -> Option<String> {
    let text = std::fs::read(dockerfile).ok()?;
    let ast = crate::frontend::parse(&text, "Dockerfile").ok()?;
    ast.nodes
        .iter()
        .take_while(|n| n.instruction != "from")
        .filter(|n| n.instruction == "arg")
        .flat_map(|n| n.args.iter())
        .filter_map(|a| a.strip_prefix("SOURCE_DATE_EPOCH="))
        .last()
        .map(|v| v.trim_matches('"').to_string())
}

/// `--secret` and `--ssh`: what the build's steps may mount.
fn session(args: &BuildArgs) -> anyhow::Result<crate::session::Session> {
    let policy = match std::env::var_os("EXPERIMENTAL_BUILDKIT_SOURCE_POLICY") {
        Some(p) if !p.is_empty() => Some(Arc::new(
            crate::session::source_policy::SourcePolicy::load(std::path::Path::new(&p))?,
        )),
        _ => None,
    };
    let mut session = crate::session::Session {
        secrets: crate::session::secrets::Secrets::load(&args.secret, |k| std::env::var_os(k))?,
        agents: BTreeMap::new(),
        policy,
    };
    for flag in &args.ssh {
        let cfg = crate::session::ssh::parse_flag(flag, |k| std::env::var_os(k))?;
        let agent = crate::session::ssh::Agent::load(&cfg)?;
        if session
            .agents
            .insert(cfg.id.clone(), Arc::new(agent))
            .is_some()
        {
            bail!("--ssh {}: the id is given twice", cfg.id);
        }
    }
    Ok(session)
}

/// `-o` outputs, and the image store output `-t` (or no `-o`) implies.
fn outputs(args: &BuildArgs) -> anyhow::Result<Vec<OutputSpec>> {
    let mut outputs = args
        .output
        .iter()
        .map(|o| OutputSpec::parse(o))
        .collect::<Result<Vec<_>, _>>()?;
    let annotations = args
        .annotation
        .iter()
        .map(|a| crate::image::output::Annotation::parse(a).map_err(anyhow::Error::msg))
        .collect::<anyhow::Result<Vec<_>>>()?;
    // -t names every output that has a name and was given none
    let tags = OutputSpec::image_store(&args.tag)?.names;
    for o in outputs
        .iter_mut()
        .filter(|o| names_an_image(o) && o.names.is_empty())
    {
        o.names.clone_from(&tags);
    }
    if outputs.iter().any(|o| o.push && o.names.is_empty()) {
        bail!("an output that pushes (type=registry or push=true) needs name= or -t NAME");
    }
    if outputs.is_empty() || !args.tag.is_empty() || args.load {
        let mut spec = OutputSpec::image_store(&args.tag)?;
        spec.push = args.push;
        outputs.push(spec);
    } else if args.push {
        bail!("--push pushes the -t names: add -t NAME");
    }
    // --annotation first, then the output's own annotation keys (later
    // ones win)
    for o in outputs.iter_mut().filter(|o| names_an_image(o)) {
        let own = std::mem::take(&mut o.annotations);
        o.annotations = annotations.iter().cloned().chain(own).collect();
    }
    Ok(outputs)
}

/// `--platform A,B`, each once, in order.
fn platforms(args: &BuildArgs) -> anyhow::Result<Vec<Platform>> {
    let mut platforms: Vec<Platform> = Vec::new();
    for p in args.platform.iter().flat_map(|p| p.split(',')) {
        let p = Platform::parse(p)?;
        if !platforms.contains(&p) {
            platforms.push(p);
        }
    }
    Ok(platforms)
}

/// Build several platforms and export them as one index.
fn build_multi_platform(
    runtime: &tokio::runtime::Runtime,
    opts: engine::BuildOptions,
    platforms: &[Platform],
    ex: &Exporting<'_>,
) -> anyhow::Result<i32> {
    use crate::image::output::OutputType;
    // refused before the build, not after it
    if let Some(o) = ex.outputs.iter().find(|o| o.kind == OutputType::Docker) {
        bail!(crate::image::export::Error::DockerMultiPlatform(format!(
            "{} in {:?}",
            ex.args.platform.join(","),
            o.kind.as_str()
        )));
    }
    let built = runtime.block_on(engine::build_platforms(
        opts,
        platforms,
        Arc::clone(ex.progress),
    ))?;
    let store = crate::image::ImageStore::new(&built[0].1.snap);
    let mut images = Vec::new();
    for (p, b) in &built {
        images.push((
            crate::image::store::Platform::from(p),
            store.get(&b.manifest, None)?,
        ));
    }
    let mut digest = None;
    let mut reported = None;
    for spec in ex.outputs {
        let t = std::time::Instant::now();
        let mut e = export_platforms(&store, &images, spec, &ex.export_opts)?;
        exported_line(ex.progress, spec, t);
        // the index and its manifests, under the names it was given
        ex.push(&built[0].1.snap, spec, &mut e)?;
        if matches!(spec.kind, OutputType::Image | OutputType::Oci) {
            digest = Some(e.manifest.digest().clone());
        }
        if ex.args.load && spec.kind == OutputType::Image && e.names.is_empty() {
            // --load without a name: the index, unnamed (see build_one_platform)
            store.add_unnamed(&e.manifest)?;
        }
        if reported.is_none() && names_an_image(spec) {
            reported = Some(e);
        }
    }
    // a multi-platform image's ID is its index's digest
    let image_id = digest.as_ref().map(ToString::to_string).unwrap_or_default();
    write_reports(ex.args, &image_id, metadata(reported.as_ref(), false))?;
    match digest {
        Some(d) => println!("{d}"),
        None => {
            for (p, b) in &built {
                println!("{p} {}", b.manifest.digest());
            }
        }
    }
    Ok(0)
}

/// The line a finished output adds to the progress: what it wrote and how
/// long that took (compressing the layers, for the image outputs).
fn exported_line(
    progress: &progress::Progress,
    spec: &crate::image::output::OutputSpec,
    since: std::time::Instant,
) {
    let secs = since.elapsed().as_secs_f64();
    let kind = spec.kind.as_str();
    progress.summary(&format!("exported type={kind} in {secs:.2}s"));
}

/// `--add-host NAME:IP` or `NAME=IP`, as buildx takes it (an IPv6 address
/// after the first colon, `host:2001:db8::1`, or in brackets).
fn parse_add_host(spec: &str) -> anyhow::Result<(String, std::net::IpAddr)> {
    let (name, ip) = spec
        .split_once('=')
        .or_else(|| spec.split_once(':'))
        .ok_or_else(|| anyhow::anyhow!("--add-host {spec:?}: expected NAME:IP"))?;
    let ip = ip.trim_start_matches('[').trim_end_matches(']');
    let ip: std::net::IpAddr = ip
        .parse()
        .map_err(|_| anyhow::anyhow!("--add-host {spec:?}: {ip:?} is not an IP address"))?;
    if name.is_empty()
        || name
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || c == '#')
    {
        bail!("--add-host {spec:?}: {name:?} is not a host name");
    }
    Ok((name.to_string(), ip))
}

#[cfg(test)]
mod add_host_tests {
    use super::parse_add_host;

    #[test]
    fn add_host_takes_what_buildx_takes() {
        let ok = |s: &str| {
            let (n, ip) = parse_add_host(s).unwrap();
            format!("{n} {ip}")
        };
        assert_eq!(ok("db:10.0.0.5"), "db 10.0.0.5");
        assert_eq!(ok("db=10.0.0.5"), "db 10.0.0.5");
        assert_eq!(ok("v6:2001:db8::1"), "v6 2001:db8::1");
        assert_eq!(ok("v6=[2001:db8::1]"), "v6 2001:db8::1");
        for bad in [
            "db",
            "db:",
            ":1.2.3.4",
            "db:999.1.1.1",
            "a b:1.2.3.4",
            "db:name",
        ] {
            assert!(parse_add_host(bad).is_err(), "{bad}");
        }
    }
}
