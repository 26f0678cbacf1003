"""What runs in the ``monolith-rt serve`` host process: the tritonserver launcher, the supervisor that
restarts it behind the fronts, and the instance-count planning for a machine.
"""
