"""Where a job runs on a node: its tiles and their environment (`tiles`), how a node's
tiles and cores are divided among engines (`node_layout`), the engines' ports (`ports`)
and the launcher templates, rendered in one place (`launcher`).

May import the ground floor (formats/, console; today it needs neither): the engines,
the rank jobs and the PBS provider all place themselves with it. Stdlib only.
"""
