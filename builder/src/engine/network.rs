//! The build's network policy: which network a process of the build gets
//! ([`entitled_network`]), and the check of a whole plan against it before
//! any step runs ([`check_plan`]).

use kiln_runtime::Network;

use super::error::{Error, Result, StepError};
use super::filecopy;
use crate::frontend::instructions::{Instruction, NetworkMode};
use crate::frontend::Plan;

/// A network a step or the build asked for and may not have.
#[derive(Debug, thiserror::Error)]
pub enum Denied {
    #[error("RUN --network={0} cannot raise the build's network: the build runs with --network=none, so no step may use a network (drop --network=none, or the step's --network)")]
    Raise(&'static str),
    #[error("--network=host needs the network.host entitlement: start the build with --allow network.host")]
    BuildHost,
    #[error("RUN --network=host needs the network.host entitlement: start the build with --allow network.host")]
    StepHost,
    #[error("ADD of a URL downloads, and the build runs with --network=none: no network is allowed (drop --network=none, or download the file into the context)")]
    AddUrl,
}

/// The network a process of the build gets: `requested` (a step's
/// `RUN --network`), else the build's `--network`. The one network policy
/// check of the build: every path that starts a process for a build asks
/// here, and the whole plan is checked before any step runs.
///
/// The build's network is a ceiling, in the order none < sandbox < host: a
/// step may lower it, never raise it, so `kiln build --network none` means
/// no step touches a network whatever the Dockerfile says. `host` needs the
/// network.host entitlement (`--allow network.host`), for the build's
/// network as for a step's; under a `sandbox` build the entitlement is
/// what lets a `RUN --network=host` through, as in BuildKit, where it is
/// the only way to the host's network.
pub fn entitled_network(
    requested: Option<NetworkMode>,
    build_default: Network,
    allow_network_host: bool,
) -> std::result::Result<Network, Denied> {
    let allow_host_loopback = match build_default {
        Network::Sandbox {
            allow_host_loopback,
        } => allow_host_loopback,
        _ => false,
    };
    Ok(match requested {
        None | Some(NetworkMode::Default) => {
            if build_default == Network::Host && !allow_network_host {
                return Err(Denied::BuildHost);
            }
            build_default
        }
        Some(NetworkMode::Host) => {
            if build_default == Network::None {
                return Err(Denied::Raise("host"));
            }
            if !allow_network_host {
                return Err(Denied::StepHost);
            }
            Network::Host
        }
        Some(NetworkMode::None) => Network::None,
        Some(NetworkMode::Sandbox) => {
            if build_default == Network::None {
                return Err(Denied::Raise("sandbox"));
            }
            Network::Sandbox {
                allow_host_loopback,
            }
        }
    })
}

/// The network policy of the whole plan, checked before any step runs
/// (and before any base image is pulled): every RUN's network against the
/// build's ([`entitled_network`]), and no `ADD <url>` under a build without
/// a network.
pub fn check_plan(
    plan: &Plan,
    file: &str,
    network: Network,
    allow_network_host: bool,
) -> Result<()> {
    for stage in &plan.stages {
        for step in &stage.steps {
            let denied = match &step.instruction {
                Instruction::Run(run) => {
                    entitled_network(run.network, network, allow_network_host).err()
                }
                Instruction::Add(add)
                    if network == Network::None && add.sources.iter().any(filecopy::is_url) =>
                {
                    Some(Denied::AddUrl)
                }
                _ => None,
            };
            if let Some(e) = denied {
                return Err(Error::Step {
                    file: file.to_string(),
                    line: step.line,
                    end_line: step.end_line,
                    instruction: step.original.clone(),
                    source: Box::new(StepError::Network(e)),
                });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SANDBOX: Network = Network::Sandbox {
        allow_host_loopback: false,
    };

    #[test]
    fn a_step_cannot_raise_itself_to_host_without_the_entitlement() {
        assert!(entitled_network(Some(NetworkMode::Host), SANDBOX, false).is_err());
        assert_eq!(
            entitled_network(Some(NetworkMode::Host), SANDBOX, true).unwrap(),
            Network::Host
        );
        // the build-level --network=host goes through the same check
        assert!(entitled_network(None, Network::Host, false).is_err());
        assert!(entitled_network(Some(NetworkMode::Default), Network::Host, false).is_err());
        assert_eq!(
            entitled_network(None, Network::Host, true).unwrap(),
            Network::Host
        );
    }

    #[test]
    fn default_means_the_build_network_and_lower_modes_need_nothing() {
        assert_eq!(entitled_network(None, SANDBOX, false).unwrap(), SANDBOX);
        assert_eq!(
            entitled_network(Some(NetworkMode::Default), Network::None, false).unwrap(),
            Network::None
        );
        assert_eq!(
            entitled_network(Some(NetworkMode::None), Network::Host, true).unwrap(),
            Network::None
        );
        let allowed = Network::Sandbox {
            allow_host_loopback: true,
        };
        assert_eq!(
            entitled_network(Some(NetworkMode::Sandbox), allowed, false).unwrap(),
            allowed
        );
    }

    #[test]
    fn the_build_network_is_a_ceiling_no_step_raises() {
        // under --network=none nothing may use a network, entitled or not
        for allow in [false, true] {
            for mode in [NetworkMode::Sandbox, NetworkMode::Host] {
                let e = entitled_network(Some(mode), Network::None, allow).unwrap_err();
                assert!(e.to_string().contains("--network=none"), "{e}");
            }
        }
        // a sandbox build lowers to none; host only with the entitlement
        assert_eq!(
            entitled_network(Some(NetworkMode::None), SANDBOX, false).unwrap(),
            Network::None
        );
        assert!(entitled_network(Some(NetworkMode::Host), SANDBOX, false).is_err());
        // a host build lowers to sandbox
        assert_eq!(
            entitled_network(Some(NetworkMode::Sandbox), Network::Host, true).unwrap(),
            SANDBOX
        );
    }
}
