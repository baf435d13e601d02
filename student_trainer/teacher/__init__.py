"""Where a run's teacher outputs come from: none, inline, remote (the Serve pool), cache or hybrid
(`sources`), each a class that says what it needs; outputs travel as `TeacherOutputs`."""
