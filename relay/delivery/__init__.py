"""From the queue to the primary: the scheduler, routes (MX), outbound sessions, what replies
mean, how outcomes are recorded, whether a primary is up, and the DSNs owed."""
