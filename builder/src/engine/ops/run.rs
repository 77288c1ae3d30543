//! RUN: the step's key ([`Engine::run_key`]), then on a miss a writable
//! view of the parent layers, the step's mounts ([`run_mounts`]), the
//! process in a sandbox ([`exec`]), and the view's diff as a layer.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use kiln_runtime::Network;

use super::{Done, StepCtx};
use crate::engine::error::StepError;
use crate::engine::solver::Engine;
use crate::engine::step_cache::{self, Key, KeyBuilder};
use crate::engine::{emulation, exec, network, run_mounts};
use crate::frontend::instructions::{Run, SecurityMode};

/// The proxy build args as a step's environment: each in both letter
/// cases (`http_proxy` also sets `HTTP_PROXY`), as BuildKit's proxy env;
/// a name given in both cases keeps each value.
fn proxy_env(given: &std::collections::BTreeMap<String, String>) -> Vec<(String, String)> {
    let mut out: std::collections::BTreeMap<String, String> = given.clone();
    for (k, v) in given {
        for other in [k.to_uppercase(), k.to_lowercase()] {
            out.entry(other).or_insert_with(|| v.clone());
        }
    }
    out.into_iter().collect()
}

/// The build arg that names RUN steps' host, as in BuildKit (kiln's own
/// name for it is `kiln`).
const SANDBOX_HOSTNAME: &str = "BUILDKIT_SANDBOX_HOSTNAME";

impl Engine {
    /// RUN: key the step, take a hit, else run it and commit its layer.
    pub(super) fn run_op(&self, ctx: &StepCtx, run: &Run) -> Result<Done, StepError> {
        if run.security == Some(SecurityMode::Insecure) {
            return Err(StepError::Insecure);
        }
        let network = network::entitled_network(
            run.network,
            self.opts.network,
            self.opts.allow_network_host,
        )?;
        let workdir = ctx.workdir();
        let context_cache = self.stat_cache(&self.opts.context);
        let resources = run_mounts::Resources {
            snap: &self.snap,
            context: &self.context,
            ignore: &self.ignore,
            stat_cache: &context_cache,
            secrets: &self.opts.session.secrets,
            agents: &self.opts.session.agents,
            cache_mounts: &self.cache_mounts,
            confinement: self.confinement(),
            no_cache_token: ctx.no_cache.then_some(self.build_token.as_str()),
        };
        let (key, by_content) = self.run_key(ctx, run, &workdir, network, &resources)?;
        let lock = self.shared.key_lock(&key);
        let _same_step = lock.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(hit) = self.hit(ctx, &key) {
            return Ok(hit);
        }
        // the content key only on a miss: it reads the mounted stage's files
        let content = by_content
            .map(|mut c| {
                run_mounts::key_inputs(&run.mounts, &ctx.from, &resources, &mut c, true)
                    .map(|()| c.finish())
            })
            .transpose()?;
        let keys = super::Keys {
            key: key.clone(),
            content,
        };
        if let Some(hit) = self.hit_by_content(ctx, &keys) {
            return Ok(hit);
        }
        // checked before the step starts: a missing qemu or an old kernel
        // fails here with what to install
        let emulators = emulation::emulators_for(&ctx.state.platform)?;
        self.progress.started(ctx.vertex, &ctx.name);
        let view = self
            .snap
            .prepare(&step_cache::view_key("run", &key), ctx.chain().as_ref())?;
        let ran = self.run_in(ctx, run, &view, &workdir, network, &resources, emulators);
        if let Err(e) = ran {
            let _ = self.snap.remove(view);
            return Err(e);
        }
        self.executed.fetch_add(1, Ordering::Relaxed);
        let mut state = ctx.state.clone();
        self.commit(
            view,
            &mut state,
            exec::created_by(run, &ctx.state, &ctx.step.args),
            ctx.vertex,
        )?;
        self.record_keys(&keys, &state);
        Ok(Done {
            key,
            content_key: keys.content,
            state,
            cached: false,
        })
    }

    /// What goes into a RUN step's key: the parent's key, the instruction
    /// as planned (command, flags, mounts as written), the build args in
    /// scope (not the proxy args, as BuildKit), the working directory, the
    /// network the step gets, the `--add-host` entries (they change what
    /// the step's /etc/hosts says), `--shm-size` and `--ulimit` when given,
    /// and what each mount brings in
    /// ([`run_mounts::key_inputs`]: the key of a `from=` source, the
    /// checksum of a bind-mounted context directory).
    /// When a bind mount reads a stage or image, the step also has a
    /// content key ([`super::Keys`]): the same with what the mount shows
    /// instead of the source's key. Returned is the builder of its common
    /// part, to finish only when the key misses.
    pub(super) fn run_key(
        &self,
        ctx: &StepCtx,
        run: &Run,
        workdir: &str,
        network: Network,
        resources: &run_mounts::Resources<'_>,
    ) -> Result<(Key, Option<KeyBuilder>), StepError> {
        let mut k = KeyBuilder::new("step");
        k.str(&ctx.parent.0)
            .str(&serde_json::to_string(&ctx.step.instruction).unwrap_or_default());
        for (a, b) in &ctx.step.args {
            k.str(a).str(b);
        }
        k.str(workdir).str(&format!("{network:?}"));
        for (name, ip) in &self.opts.extra_hosts {
            k.str(&format!("add-host {name} {ip}"));
        }
        // as BuildKit's exec op: the step's /dev/shm and limits
        if let Some(h) = self.opts.build_args.get(SANDBOX_HOSTNAME) {
            k.str(&format!("hostname {h}"));
        }
        if let Some(size) = self.opts.shm_size {
            k.str(&format!("shm-size {size}"));
        }
        for u in &self.opts.ulimits {
            k.str(&format!("ulimit {:?} {} {}", u.kind, u.soft, u.hard));
        }
        if let Some(e) = self.layer_epoch() {
            k.str(&format!("epoch {e}"));
        }
        let content = run_mounts::binds_an_image(&run.mounts, &ctx.from).then(|| k.clone());
        run_mounts::key_inputs(&run.mounts, &ctx.from, resources, &mut k, false)?;
        Ok((k.finish(), content))
    }

    /// Mount the step's `--mount`s on `view` and run its process there.
    #[allow(clippy::too_many_arguments)]
    fn run_in(
        &self,
        ctx: &StepCtx,
        run: &Run,
        view: &kiln_snapshotter::snapshot::View,
        workdir: &str,
        network: Network,
        resources: &run_mounts::Resources<'_>,
        emulators: Vec<kiln_runtime::Emulator>,
    ) -> Result<(), StepError> {
        let time_limit = self.opts.time_limits.for_step()?;
        let cgroup = match &self.opts.step_cgroups {
            Some(c) => Some(c.make().map_err(exec::Error::from)?),
            None => None,
        };
        let mut mounted = run_mounts::mount(view.path(), &run.mounts, &ctx.from, resources)?;
        // the build args in scope and the proxy args: the step's environment
        let mut args = ctx.step.args.clone();
        args.extend(proxy_env(&self.plan.proxy_args));
        let spec = exec::RunSpec {
            run,
            state: &ctx.state,
            args: &args,
            workdir,
            network,
            extra_hosts: &self.opts.extra_hosts,
            vertex: ctx.vertex,
            mounts: std::mem::take(&mut mounted.spec_mounts),
            private: std::mem::take(&mut mounted.private),
            env: std::mem::take(&mut mounted.env),
            redactor: Arc::clone(&self.redactor),
            emulators,
            shm_size: self.opts.shm_size,
            ulimits: &self.opts.ulimits,
            default_ulimits: &self.opts.default_ulimits,
            hostname: self
                .opts
                .build_args
                .get(SANDBOX_HOSTNAME)
                .map_or("kiln", String::as_str),
            time_limit,
            cgroup,
        };
        let r = exec::run(view.path(), spec, &self.progress);
        for warning in mounted.stop_agents() {
            self.progress.log(ctx.vertex, 2, &warning);
        }
        // mount stubs go before the layer is made
        drop(mounted);
        r.map_err(StepError::from)
    }
}
