"""`python -m rlhf_jax.chat --model PATH`: chat with a policy in the terminal (see `cli`)."""

from rlhf_jax.chat.cli import main

main()
