"""Mechanics: group-buy, vouchers (and, with later issues, solitaire, referral, rewards).

Each mechanic has tables (`models`), pure rules (`rules`) and a service whose operations run
inside the write path's transaction (see `app.mechanics.commands`): they lock what they
change, decide with the pure rules, write, and return the events they emit, which the
dispatcher then steps through every funnel of each member concerned. Nothing here commits.
"""
