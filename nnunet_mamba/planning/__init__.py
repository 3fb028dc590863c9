"""Planning for our networks: :mod:`.plans` writes nnU-Net plans files (``nnunet-mamba plan``), :mod:`.memory`
estimates a training step's peak GPU memory on the CPU, :mod:`.baselines` holds nnU-Net's own networks and planner
rules that both compare against."""
