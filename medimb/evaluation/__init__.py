"""medimb.evaluation"""
