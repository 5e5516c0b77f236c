def plan_parallel(*a, **k): raise NotImplementedError
def simulate_table(*a, **k): raise NotImplementedError
