"""medimb.losses"""
