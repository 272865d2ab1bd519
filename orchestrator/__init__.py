"""maft-orchestrator: multiagent finetuning (Subramaniam et al., ICLR 2025) as a resumable, tracked tool."""

__version__ = "0.1.0"
