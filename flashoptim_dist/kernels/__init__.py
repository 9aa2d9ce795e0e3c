"""Private Triton kernels. The public API never exposes them; see flashoptim_dist.reference
for the math they implement."""
