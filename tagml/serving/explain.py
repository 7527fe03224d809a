"""Reasons in words a relationship manager understands (PIPL Art. 24): reason codes such as `share_equity high`
turned into sentences from the feature dictionary."""
