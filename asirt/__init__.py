from asirt.errors import AsirtError
