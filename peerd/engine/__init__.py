"""Pure decisions about one content: which chunk to ask whom for, who is
uploaded to next, when to announce and dial. No I/O, no clock: time is passed in."""
