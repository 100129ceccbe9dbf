"""SMTP in: the door. Intake speaks the protocol; limits, DNS lists, the recipient policy and
the content filter answer its questions before anything is stored."""
