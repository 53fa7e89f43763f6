"""`python -m featurecache ...` (what `torchrun -m featurecache train ...` runs)."""

from featurecache.cli import main

main()
