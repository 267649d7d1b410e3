"""The KVM workload: exit profiles, the mitigation strategies as data, the one vCPU loop, and
the guest backends (emulated, and a real guest through /dev/kvm).

Layering: this package imports asirt.cpu, asirt.mm and asirt.sync (and the host modules
below them); never scenarios, the orchestrator or the CLI. The /dev/kvm device layer
(``api``, ``vm``, ``guest``) imports only the standard library and asirt.errors.
"""
