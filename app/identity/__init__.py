"""Member login for mini-programs: identity providers exchange a login code for an openid."""
