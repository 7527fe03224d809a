"""`tagml audience count|export`: audiences (圈人) selected by a JSON query over tags."""
