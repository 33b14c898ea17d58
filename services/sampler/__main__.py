"""`python -m services.sampler --validate-config FILE`: check a sampling policy file."""

from services.sampler.policy import main

raise SystemExit(main())
