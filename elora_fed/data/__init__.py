"""Every client's samples: Shakespeare roles and BIG-bench tasks, cut, split and cached."""
