"""What to update: the sensitivity table and its measurement, the device's cost profile, the analytic memory
estimate, and the planner that turns a table and a budget into a scheme. The top part: it may import every other
sub-package."""
