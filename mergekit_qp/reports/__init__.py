"""Reports: the merge report, the spectrum report, and ρ of any merged checkpoint (never mergekit)."""
